"""Every tensor op of the pipeline follows its inputs' device and dtype.

On a machine without a GPU, float64 stands in for a second device: with a float64 model and
float64 data, an op that meets a non-scalar float32 tensor got it from a tensor created without
the input's dtype (a torch.randn(shape) with no dtype=, a CPU draw moved over), the same mistake
that on CUDA mixes a CPU tensor into GPU work. Scalars (0-dim) may mix, as they may across devices.
"""

import math
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from bound_tuner.data import swiss_roll
from bound_tuner.evaluation.elbo import negative_elbo
from bound_tuner.evaluation.experiment import run_diffusion
from bound_tuner.maths.sde import get_schedule
from bound_tuner.training.config import DiffusionConfig
from bound_tuner.training.pack import train_packed
from bound_tuner.training.sampling import generate

# conversions: Module.to(dtype) and copies may take one dtype into another
CONVERSIONS = {"__set__", "_has_compatible_shallow_copy_type", "copy_", "set_"}


class MixedPrecisionOps(TorchFunctionMode):
    """Records each torch op (not a conversion) whose non-scalar floating inputs have more than
    one dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in CONVERSIONS:
            return func(*args, **kwargs)
        leaves, _ = tree_flatten((args, kwargs))
        dtypes = {
            a.dtype
            for a in leaves
            if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() > 0
        }
        if len(dtypes) > 1:
            where = "".join(traceback.format_stack(limit=4)[:-1])
            self.found.append(
                f"{getattr(func, '__name__', func)} on {sorted(map(str, dtypes))}\n{where}"
            )
        return func(*args, **kwargs)


def test_the_check_catches_a_tensor_made_without_the_input_dtype():
    x = torch.zeros(4, 2, dtype=torch.float64)
    with MixedPrecisionOps() as mode:
        _ = x + torch.randn(4, 2)  # no dtype=: float32 meets float64
        _ = x * torch.tensor(2.0)  # a scalar may mix
    assert len(mode.found) == 1 and "float32" in mode.found[0]


def test_diffusion_pipeline_follows_the_data_dtype():
    x = swiss_roll(64, seed=0).double()
    test = swiss_roll(200, seed=1).double()
    cfg = DiffusionConfig(
        T=0.6,
        width=16,
        layers=2,
        steps=12,
        batch_size=16,
        n_steps=10,
        n_paths=16,
        train_draws=2,
        heldout_n_generated=200,
        heldout_n_steps=10,
        lam=1.0,
    )
    schedule = get_schedule("cosine")
    with MixedPrecisionOps() as mode:
        for variant in ("elbo", "paper", "elbo-split", "elbo-encoder"):
            res = run_diffusion(
                x,
                DiffusionConfig(**{**cfg.to_dict(), "variant": variant}),
                test=test,
                validation=True,
                device="cpu",
            )
        assert next(res.model.parameters()).dtype == torch.float64
        negative_elbo(res.model, test, schedule, T=0.6, draws=2)
        generate(res.model, schedule, T=0.6, n=8, shape=(2,), n_steps=5)
        packed = train_packed(
            x, [cfg, DiffusionConfig(**{**cfg.to_dict(), "T": 0.9})], device="cpu"
        )
    assert all(m.error is None for m in packed)
    assert not mode.found, "ops mixing dtypes:\n" + "\n".join(mode.found[:5])


def test_vae_pipeline_follows_the_data_dtype():
    from bound_tuner.evaluation.vae_bound import vae_bound
    from bound_tuner.models.vae import MLPVAE
    from bound_tuner.training.vae import train_vae

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(48, 1, 4, 4, generator=g) < 0.5).double()
    model = MLPVAE(input_dim=16, hidden=(8,), latent=2).double()
    with MixedPrecisionOps() as mode:
        train_vae(model, x, epochs=2, batch_size=16, lam=1.0, dynamic_binarize=True)
        rep = vae_bound(model, x, decoder0=model.initial_decoder(), test_x=x[:16], mc_samples=2)
    assert math.isfinite(rep.total)
    assert not mode.found, "ops mixing dtypes:\n" + "\n".join(mode.found[:5])
