"""A short demonstration of the gate distributions: ``python -m pyro_sbp.demo``.

Fits a linear model ``y = x @ (theta * w) + noise`` in which only the first three of eight
inputs carry signal, with one multiplicative gate ``theta`` per input: prior
``TruncatedLogUniform(e^-20, 1)``, posterior ``TruncatedLogNormal`` fitted by SVI with
``TraceMeanField_ELBO`` (so the KL term is the closed form). The gates of the useless inputs
collapse towards ``e^-20`` while those of the useful ones stay near 1; the table printed at the
end shows the posterior of each gate.
"""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.optim import Adam
from tqdm.auto import trange

from pyro_sbp.distributions import TruncatedLogNormal, TruncatedLogUniform

LOW, HIGH = math.exp(-20.0), 1.0


def make_data(n: int = 2000, d: int = 8, informative: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.zeros(d)
    w[:informative] = torch.tensor([2.0, -1.5, 1.0])
    y = x @ w + 0.3 * torch.randn(n, generator=g)
    return x, y


def model(x, y):
    d = x.shape[1]
    w = pyro.param("w", torch.zeros(d))
    theta = pyro.sample(
        "gate", TruncatedLogUniform(torch.tensor(LOW), torch.tensor(HIGH)).expand([d]).to_event(1)
    )
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ (theta * w), 0.3), obs=y)


def guide(x, y):
    d = x.shape[1]
    loc = pyro.param("gate_loc", torch.zeros(d))
    log_scale = pyro.param("gate_log_scale", torch.full((d,), -5.0))
    pyro.sample("gate", TruncatedLogNormal(loc, log_scale.exp(), LOW, HIGH).to_event(1))


def main(steps: int = 1500) -> None:
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    x, y = make_data()
    svi = SVI(model, guide, Adam({"lr": 0.05}), TraceMeanField_ELBO())
    bar = trange(steps, desc="SVI", leave=False, disable=None)
    for _ in bar:
        loss = svi.step(x, y)
        bar.set_postfix(loss=f"{loss:.1f}")
    loc = pyro.param("gate_loc").detach()
    scale = pyro.param("gate_log_scale").detach().exp()
    q = TruncatedLogNormal(loc, scale, LOW, HIGH)
    snr = q.mean / q.variance.sqrt()
    w = pyro.param("w").detach()
    print(f"final loss {loss:.1f}; inputs 0-2 carry signal, 3-7 are noise\n")
    print(f"{'input':>5} {'loc':>8} {'scale':>9} {'E[theta]':>10} {'SNR':>8} {'w':>7}  kept")
    for j in range(len(loc)):
        kept = "yes" if snr[j] > 1 else "no"
        print(
            f"{j:>5} {loc[j]:>8.2f} {scale[j]:>9.2e} {q.mean[j]:>10.3e} "
            f"{snr[j]:>8.2f} {w[j]:>7.2f}  {kept}"
        )


if __name__ == "__main__":
    main()
