"""optuna-dashboard views of a study (trial notes, sample images, custom charts), the server, and the
text report. Reads and writes the study's own storage; storage never imports this package."""
