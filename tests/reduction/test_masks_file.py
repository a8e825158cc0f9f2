"""masks.pt: written atomically, read safely, checked against the network it is applied to."""

import os

import pytest
import torch
from torch import nn

from pyro_sbp.infer import CheckpointError
from pyro_sbp.models import make_prunable, named_gates
from pyro_sbp.reduction import apply_masks, load_masks, save_masks


def _net(hidden=5):
    return make_prunable(nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, 2)))


def test_masks_round_trip(tmp_path):
    masks = {"0.gate": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])}
    save_masks(masks, tmp_path / "masks.pt")
    got = load_masks(tmp_path / "masks.pt", _net())
    assert got.keys() == masks.keys()
    assert got["0.gate"].dtype == torch.bool
    assert got["0.gate"].tolist() == [True, False, True, True, False]
    # A plain dict of bool tensors: torch's safe loader reads it without pyro-sbp.
    raw = torch.load(tmp_path / "masks.pt", weights_only=True)
    assert torch.equal(raw["0.gate"], got["0.gate"])


def test_masks_of_another_network_name_the_file(tmp_path):
    save_masks({"0.gate": torch.ones(7)}, tmp_path / "masks.pt")
    with pytest.raises(CheckpointError) as info:
        load_masks(tmp_path / "masks.pt", _net())
    message = str(info.value)
    assert f"{tmp_path / 'masks.pt'} holds masks for another network" in message
    assert "shape (7,), expected (5,)" in message
    save_masks({"features.0.gate": torch.ones(5)}, tmp_path / "masks.pt")
    with pytest.raises(CheckpointError, match="unknown gate sites"):
        load_masks(tmp_path / "masks.pt", _net())


@pytest.mark.parametrize(
    "content",
    [[1, 2], {"0.gate": [True]}, {"0.gate": torch.ones(5)}, {"0.gate": torch.ones(1, 5).bool()}],
    ids=["list", "list mask", "float mask", "2-d mask"],
)
def test_files_that_are_not_masks_are_refused(tmp_path, content):
    torch.save(content, tmp_path / "masks.pt")
    with pytest.raises(CheckpointError, match="not a masks file"):
        load_masks(tmp_path / "masks.pt")


def test_a_malicious_masks_file_is_not_unpickled(tmp_path):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"0.gate": Payload()}, tmp_path / "masks.pt")
    with pytest.raises(CheckpointError, match="refusing to unpickle it"):
        load_masks(tmp_path / "masks.pt")
    assert not marker.exists()


def test_apply_masks_checks_every_mask_before_writing_any():
    net = make_prunable(
        nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    )
    good = {"0.gate": torch.zeros(4), "2.gate": torch.zeros(6)}
    with pytest.raises(ValueError, match=r"'2\.gate' has shape"):
        apply_masks(net, good)
    assert all(bool((g.mask == 1).all()) for _, g in named_gates(net))
