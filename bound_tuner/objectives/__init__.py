"""The Optuna objectives (where Optuna meets torch) and the factory that builds a study's data,
objective and Optuna study from a spec."""
