"""The CUDA paths, checked on the CPU: compiled graphs across the runs of a sweep, the arithmetic and
determinism settings, device placement and backend under torchrun, and the config keys that choose them."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist

from robustmargin import device as device_mod
from robustmargin import distributed
from robustmargin.config import config_from_dict
from robustmargin.errors import UserError

train_mod = sys.modules["robustmargin.train"]

N, BATCH = 50, 20  # two full batches and a short one per pass


def config(width: float = 1.0, **train_keys):
    return config_from_dict({"data": {"name": "mnist5k"},
                             "model": {"name": "mlp", "hidden": [64], "bias": "none", "width": width},
                             "train": {"batch_size": BATCH, "epochs": 1, **train_keys}})


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


# --- compiled graphs across the runs of a sweep -------------------------------------------------------

def test_a_sweep_of_six_widths_compiles_every_run(tmp_path, monkeypatch):
    """Six model shapes, one after another in one process, each Trainer's steps all run through compiled
    graphs (two per run: full and short batch). Kept across runs, 12 graphs would pass torch's
    per-function limit of 8 and the last runs would train eagerly."""
    graphs, executed = [], [0]

    def counting_backend(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            executed[0] += 1
            return gm.forward(*args)
        return run

    monkeypatch.setattr(train_mod, "COMPILE_DEVICES", ("cpu",))
    monkeypatch.setattr(train_mod, "COMPILE_OPTIONS", {"backend": counting_backend, "dynamic": False})
    data = {"train": synthetic(N, 0), "test": synthetic(10, 1)}
    for i, width in enumerate([0.25, 0.5, 0.75, 1.0, 1.25, 1.5]):
        trainer = train_mod.Trainer(config(width=width), tmp_path / str(i), quiet=True, data=data)
        trainer.log_frame = trainer.evaluate_train().log_mean
        before_graphs, executed[0] = len(graphs), 0
        trainer.sgd_pass()
        assert len(graphs) - before_graphs == 2, width      # compiled afresh: full and short batch
        assert executed[0] == trainer.grad_evals == 3, width  # and every step ran through them


# --- arithmetic and determinism on CUDA ---------------------------------------------------------------

def settings() -> dict:
    b = torch.backends
    return {"conv": b.cudnn.conv.fp32_precision, "rnn": b.cudnn.rnn.fp32_precision,
            "matmul": b.cuda.matmul.fp32_precision, "cudnn_tf32": b.cudnn.allow_tf32,
            "matmul_tf32": b.cuda.matmul.allow_tf32, "cudnn_deterministic": b.cudnn.deterministic,
            "benchmark": b.cudnn.benchmark, "deterministic": torch.are_deterministic_algorithms_enabled(),
            "workspace": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


@pytest.fixture
def restored(monkeypatch):
    """The process's CUDA settings as they were before the test (configure changes globals)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = settings()
    yield before
    b = torch.backends
    b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = before["cudnn_tf32"], before["matmul_tf32"]
    b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision = before["conv"], before["rnn"]
    b.cuda.matmul.fp32_precision = before["matmul"]
    b.cudnn.deterministic, b.cudnn.benchmark = before["cudnn_deterministic"], before["benchmark"]
    torch.use_deterministic_algorithms(before["deterministic"])


IEEE_DETERMINISTIC = {"conv": "ieee", "rnn": "ieee", "matmul": "ieee", "cudnn_tf32": False, "matmul_tf32": False,
                      "cudnn_deterministic": True, "benchmark": False, "deterministic": True, "workspace": ":4096:8"}
TF32_FAST = {"conv": "tf32", "rnn": "tf32", "matmul": "tf32", "cudnn_tf32": True, "matmul_tf32": True,
             "cudnn_deterministic": False, "benchmark": True, "deterministic": False, "workspace": ":4096:8"}


def test_torch_defaults_are_tf32_convolutions(restored):
    """The premise: left alone, cuDNN convolutions run in TF32 on CUDA."""
    assert restored["conv"] == "tf32" and not restored["deterministic"]


def test_configure_defaults_to_ieee_and_deterministic(restored):
    device_mod.configure("cuda")
    assert settings() == IEEE_DETERMINISTIC


def test_configure_fast_and_tf32_when_asked(restored):
    device_mod.configure(torch.device("cuda", 1), deterministic=False, tf32=True)
    assert settings() == TF32_FAST
    device_mod.configure("cuda:0")  # and back, in the same process
    assert settings() == IEEE_DETERMINISTIC


def test_configure_leaves_the_cpu_as_it_is(restored):
    device_mod.configure("cpu")
    assert settings() == restored


def test_a_nondeterministic_cublas_workspace_is_a_user_error(restored, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(UserError, match="CUBLAS_WORKSPACE_CONFIG"):
        device_mod.configure("cuda")
    device_mod.configure("cuda", deterministic=False)  # fast mode does not need it


def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def launch(monkeypatch, rank: int = 0, size: int = 1, local_rank: int = 0, local_size: int | None = None) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(size))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(size if local_size is None else local_size))


@pytest.mark.parametrize("keys, expected", [({}, IEEE_DETERMINISTIC),
                                            ({"deterministic": False, "tf32": True}, TF32_FAST)])
def test_training_on_cuda_applies_the_configured_settings(restored, monkeypatch, keys, expected):
    fake_gpus(monkeypatch, 2)
    launch(monkeypatch, rank=1, size=2, local_rank=1)
    assert train_mod.train_device(config(device="cuda", **keys).train) == torch.device("cuda", 1)
    assert settings() == expected


def test_training_on_the_cpu_changes_no_setting(restored, monkeypatch):
    fake_gpus(monkeypatch, 2)
    assert train_mod.train_device(config(device="cpu", tf32=True).train) == torch.device("cpu")
    assert settings() == restored


def test_the_trainer_takes_its_device_from_train_device(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(train_mod, "train_device", lambda t: seen.append(t) or torch.device("cpu"))
    cfg = config(device="cuda", deterministic=False)
    train_mod.Trainer(cfg, tmp_path, quiet=True, data={"train": synthetic(N, 0), "test": synthetic(10, 1)})
    assert seen == [cfg.train]


# --- device placement and backend under torchrun -------------------------------------------------------

@pytest.mark.parametrize("device, gpus, launched, expected", [
    # one process: the device as given
    ("cuda", 2, {}, "cuda"),
    ("cuda:1", 2, {}, "cuda:1"),
    ("cuda:2", 2, {}, "sees 2 CUDA"),
    ("cpu", 0, {"rank": 1, "size": 2, "local_rank": 1}, "cpu"),
    # torchrun, every rank sees the node's GPUs: cuda:LOCAL_RANK
    ("cuda", 2, {"rank": 1, "size": 2, "local_rank": 1}, "cuda:1"),
    ("cuda", 8, {"rank": 1, "size": 2, "local_rank": 1}, "cuda:1"),
    ("cuda", 2, {"rank": 3, "size": 4, "local_rank": 1, "local_size": 2}, "cuda:1"),  # two nodes
    # a single GPU of its own per rank (per-task CUDA_VISIBLE_DEVICES)
    ("cuda", 1, {"rank": 1, "size": 2, "local_rank": 1}, "cuda:0"),
    ("cuda", 1, {"rank": 5, "size": 8, "local_rank": 1, "local_size": 4}, "cuda:0"),
    # refused: one named GPU for every rank, more ranks on a node than GPUs, no CUDA at all
    ("cuda:0", 2, {"rank": 1, "size": 2, "local_rank": 1}, "names one GPU for all 2 ranks"),
    ("cuda", 2, {"rank": 2, "size": 3, "local_rank": 2}, "3 ranks on this node but 2 GPUs"),
    ("cuda", 0, {}, "no CUDA device"),
    ("cuda", 0, {"rank": 1, "size": 2, "local_rank": 1}, "no CUDA device"),
    ("cuda:x", 2, {}, "bad device"),
])
def test_rank_device_decision_table(monkeypatch, device, gpus, launched, expected):
    fake_gpus(monkeypatch, gpus)
    launch(monkeypatch, **launched)
    if expected.startswith(("cpu", "cuda")):
        assert distributed.rank_device(device) == torch.device(expected)
    else:
        with pytest.raises(UserError, match=expected) as err:
            distributed.rank_device(device)
        assert "\n" not in str(err.value)


def test_ranks_that_never_meet_share_gpus_round_robin(monkeypatch):
    """alone() (the runs of a sweep): no NCCL between the ranks, so three ranks may share two GPUs."""
    fake_gpus(monkeypatch, 2)
    launch(monkeypatch, rank=2, size=3, local_rank=2)
    assert distributed.rank_device("cuda", collective=False) == torch.device("cuda", 0)


@pytest.fixture
def fake_group(monkeypatch):
    """init()'s calls into CUDA and torch.distributed, recorded instead of made."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "new_group", lambda backend, **kw: calls.append(("new_group", backend)))
    monkeypatch.setattr(distributed, "_side", {})
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(("threads", n)))
    return calls


@pytest.mark.parametrize("gpus, local_rank, expected", [(2, 1, "cuda:1"), (1, 1, "cuda:0")])
def test_init_on_cuda_sets_the_rank_device_and_uses_nccl(monkeypatch, fake_group, gpus, local_rank, expected):
    fake_gpus(monkeypatch, gpus)
    launch(monkeypatch, rank=local_rank, size=2, local_rank=local_rank)
    distributed.init("cuda")
    assert fake_group == [("set_device", torch.device(expected)), ("init", "nccl"), ("new_group", "gloo")]


def test_init_on_the_cpu_uses_gloo(monkeypatch, fake_group):
    fake_gpus(monkeypatch, 2)
    launch(monkeypatch, rank=1, size=2, local_rank=1)
    distributed.init("cpu")
    assert [c for c in fake_group if c[0] != "threads"] == [("init", "gloo")]


def test_cuda_without_cuda_under_torchrun_fails_before_any_cuda_call(monkeypatch, fake_group):
    fake_gpus(monkeypatch, 0)
    launch(monkeypatch, rank=1, size=2, local_rank=1)
    with pytest.raises(UserError, match="no CUDA device"):
        distributed.init("cuda")
    assert fake_group == []


def test_backend_is_nccl_for_every_cuda_device():
    assert [distributed.backend(d) for d in ("cuda", "cuda:3", torch.device("cuda", 1), "cpu")] == \
        ["nccl", "nccl", "nccl", "gloo"]


# --- config keys --------------------------------------------------------------------------------------

def test_deterministic_by_default_and_ieee_unless_tf32_asked_for():
    t = config().train
    assert t.deterministic is True and t.tf32 is False
    t = config(deterministic=False, tf32=True).train
    assert t.deterministic is False and t.tf32 is True
    with pytest.raises(UserError, match="train.deterministic must be bool"):
        config(deterministic=1)


@pytest.mark.parametrize("seed", [-1, 2 ** 63 - 1, 2 ** 64])
def test_seed_out_of_range_is_a_one_line_error(seed):
    with pytest.raises(UserError, match=r"train.seed must be in \[0, 2\^63 - 2\]") as err:
        config(seed=seed)
    assert "\n" not in str(err.value)


def test_seed_range_ends_are_accepted():
    assert [config(seed=s).train.seed for s in (0, 2 ** 63 - 2)] == [0, 2 ** 63 - 2]
