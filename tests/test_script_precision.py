"""Mixed precision through the training script itself (``training/train_mmf.py``), as users run it.

Under ``--mixed_precision bf16|fp16`` accelerate wraps the prepared model's forward in autocast; the script strips that
wrapper and puts autocast around the loss call instead, so the loss can compute du/dt in float32 with autocast off
(before, bf16 trained on a du/dt about 17x too large here: mean |du/dt| 3.70 against 0.210). Each test runs the
script's ``main`` in this process (accelerate's state reset between runs) for one optimiser step of a tiny UNet on
scikit-learn's digits, and compares the step-1 loss, mean |du/dt| and gradient norm of ``logs/train_log.jsonl``
against the float32 run with the same seed (same data, times and noise): within 5%, and not bit-identical (the low
precision really ran). Two processes: ``accelerate launch --multi_gpu --num_processes 2`` over gloo.

fp16 on a CPU: accelerate 1.15 gives a CPU neither fp16 autocast nor a gradient scaler (the run is float32, and the
script says so; checked below). The fp16 tests therefore give the CPU what accelerate gives a GPU (``cpu_fp16``: the
Accelerator's ``native_amp`` and a ``torch.amp.GradScaler("cpu")``), so the script's fp16 path (autocast in fp16, the
scaled backward, skipped steps) runs here. CPU fp16 kernels are slow, so fp16 is tested on fewer combinations.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))

import train_mmf  # noqa: E402

TINY = ["--dataset_name", "sklearn-digits", "--resolution", "8", "--block_out_channels", "8", "16",
        "--train_batch_size", "8", "--lr_warmup_steps", "0", "--seed", "0", "--logger", "none",
        "--checkpointing_steps", "100", "--num_sample_images", "4", "--r_neq_t_fraction", "0.25"]
KEYS = ("loss", "mean_abs_dudt", "grad_norm")


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps its state (mixed precision included) per process: reset it around each run of main."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture
def cpu_fp16(monkeypatch):
    """What accelerate gives a GPU under fp16, given to the CPU: autocast (native_amp) and a gradient scaler."""
    from accelerate import Accelerator

    original = Accelerator.__init__
    scalers = []

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.state.mixed_precision == "fp16" and self.device.type == "cpu":
            self.native_amp = True
            self.scaler = torch.amp.GradScaler("cpu", **(scalers[-1] if scalers else {}))

    monkeypatch.setattr(Accelerator, "__init__", init)
    return scalers  # append GradScaler keyword arguments to change the next scaler


def run(out: Path, *flags, steps: int = 1) -> dict:
    """train_mmf.main on a fresh accelerate state; returns step -> the logged record."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    assert train_mmf.main([*TINY, "--max_train_steps", str(steps), "--output_dir", str(out), *map(str, flags)]) == 0
    records = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "step" in r}


def assert_close_to_float32(low: dict, ref: dict, what: str) -> None:
    for key in KEYS:
        assert abs(low[key] - ref[key]) <= 0.05 * abs(ref[key]), (what, key, low[key], ref[key])
    assert ref["mean_abs_dudt"] > 0.01 and ref["frac_r_neq_t"] > 0  # the derivative term is there
    assert any(low[key] != ref[key] for key in KEYS), f"{what}: identical to float32, so no low precision ran"


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  latent_channels=4, norm_num_groups=4, sample_size=8, scaling_factor=1.7).save_pretrained(folder / "vae")
    return folder


CASES = {
    # name: (flags, precisions compared with float32)
    "fd-paired-lam0": (["--derivative", "finite_difference"], ("bf16", "fp16")),
    "fd-unpaired-lam1": (["--derivative", "finite_difference", "--pair_rows", "0", "--lam_end", "1"], ("bf16",)),
    "jvp-paired-lam1": (["--derivative", "jvp", "--lam_end", "1"], ("bf16", "fp16")),
    "jvp-unpaired-lam0": (["--derivative", "jvp", "--pair_rows", "0"], ("bf16",)),
    "fd-conditional-guided-lam1": (["--derivative", "finite_difference", "--class_conditional", "--label_dropout",
                                    "0.25", "--cfg_w", "1.5", "--lam_end", "1"], ("bf16",)),
    "jvp-conditional-lam0": (["--derivative", "jvp", "--class_conditional"], ("bf16",)),
    "fd-latent-lam1": (["--derivative", "finite_difference", "--lam_end", "1", "LATENT"], ("bf16",)),
    "jvp-latent-lam0": (["--derivative", "jvp", "LATENT"], ("bf16",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_in_low_precision_matches_float32_through_the_script(tmp_path, case, fresh_accelerate, cpu_fp16,
                                                                     tiny_vae_dir):
    flags, precisions = CASES[case]
    if "LATENT" in flags:
        flags = [f for f in flags if f != "LATENT"] + ["--vae_name_or_path", tiny_vae_dir / "vae", "--center_crop",
                                                       "--latent_cache_dir", tiny_vae_dir / "cache"]
    ref = run(tmp_path / "no", *flags, "--mixed_precision", "no")[1]
    for precision in precisions:
        low = run(tmp_path / precision, *flags, "--mixed_precision", precision)[1]
        assert_close_to_float32(low, ref, f"{case} {precision}")


def test_fp16_without_autocast_on_a_cpu_is_float32_and_says_so(tmp_path, fresh_accelerate, capsys):
    """accelerate runs fp16 in float32 on a CPU: the script prints it instead of letting it pass silently."""
    ref = run(tmp_path / "no", "--mixed_precision", "no")[1]
    fp16 = run(tmp_path / "fp16", "--mixed_precision", "fp16")[1]
    assert "this run computes in float32" in capsys.readouterr().out
    assert all(fp16[key] == ref[key] for key in KEYS)


def test_the_script_flag_wins_over_the_launcher_and_accelerate_setting_is_the_default(tmp_path, fresh_accelerate,
                                                                                      capsys, monkeypatch):
    """``accelerate launch`` without a configuration exports ACCELERATE_MIXED_PRECISION=no (and prints that it "was
    set to a value of 'no'"): the script's --mixed_precision wins and the log says so; without the flag the script
    takes accelerate's setting."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    run(tmp_path / "flag", "--mixed_precision", "bf16")
    assert "Mixed precision: bf16 (this script's --mixed_precision; it overrides accelerate's 'no'" in \
        capsys.readouterr().out
    assert json.loads((tmp_path / "flag" / "training_config.json").read_text())["mixed_precision"] == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    run(tmp_path / "env")
    assert "overrides" not in capsys.readouterr().out
    assert json.loads((tmp_path / "env" / "training_config.json").read_text())["mixed_precision"] == "bf16"


def test_a_step_the_fp16_scaler_skips_moves_nothing(tmp_path, fresh_accelerate, cpu_fp16):
    """A scale of 2**120 overflows every fp16 gradient, so the scaler skips both steps: the weights, the LR schedule,
    the curriculum (lam) and the EMA stay where they were; with the default scale the same run moves all four."""
    from safetensors.torch import load_file

    flags = ["--mixed_precision", "fp16", "--lam_schedule", "linear", "--lam_warmup_steps", "2", "--lr_warmup_steps",
             "4", "--use_ema", "--checkpointing_steps", "1"]
    cpu_fp16.append({"init_scale": 2.0 ** 120})
    skipped = run(tmp_path / "skipped", *flags, steps=2)
    cpu_fp16.append({})
    normal = run(tmp_path / "normal", *flags, steps=2)

    assert [skipped[s]["skipped"] for s in (1, 2)] == [True, True]
    assert [normal[s]["skipped"] for s in (1, 2)] == [False, False]
    assert skipped[2]["lam"] == skipped[1]["lam"] == 0.0 and normal[2]["lam"] == 0.5
    assert skipped[2]["lr"] == skipped[1]["lr"] and normal[2]["lr"] > normal[1]["lr"]
    states = {name: json.loads((tmp_path / name / "checkpoint-2" / "mmf_state.json").read_text())
              for name in ("skipped", "normal")}
    assert states["skipped"]["ema"]["optimization_step"] == 0 and states["normal"]["ema"]["optimization_step"] == 2
    assert states["skipped"]["lr_scheduler"]["last_epoch"] == 0 and states["normal"]["lr_scheduler"]["last_epoch"] == 2
    for name, still in (("skipped", True), ("normal", False)):
        before, after = (load_file(str(tmp_path / name / f"checkpoint-{s}" / "model.safetensors")) for s in (1, 2))
        assert all(torch.equal(before[k], after[k]) for k in before) == still, name


@pytest.mark.slow
@pytest.mark.parametrize("derivative", ["finite_difference", "jvp"])
def test_two_processes_in_bf16_match_one_process_in_float32(tmp_path, derivative, fresh_accelerate):
    """2 processes x batch 4 under bf16 (accelerate launch over gloo; the launcher's own --mixed_precision is 'no',
    the script's flag wins) against 1 process x batch 8 in float32 and in bf16: step-1 figures within 5% of float32,
    and within 1% of the one-process bf16 run (same rows, times and noise on both sides)."""
    from test_multiprocess import free_port
    from test_training import accelerate_launch, check, read_log, run_script

    flags = ["--derivative", derivative, "--lam_end", "1"]
    args = [*TINY, "--max_train_steps", "1", *flags, "--mixed_precision", "bf16", "--check_param_sync"]
    args[args.index("--train_batch_size") + 1] = "4"
    result = run_script(tmp_path, args + ["--output_dir", tmp_path / "two"], launcher=accelerate_launch(2, free_port()),
                        timeout=400)
    check(result)
    assert "num_processes 2" in result.stdout and "overrides accelerate's 'no'" in result.stdout
    two = read_log(tmp_path / "two")[1]
    ref = run(tmp_path / "no", *flags, "--mixed_precision", "no")[1]
    one = run(tmp_path / "bf16", *flags, "--mixed_precision", "bf16")[1]
    assert_close_to_float32(two, ref, f"2 processes {derivative} bf16")
    for key in KEYS:
        assert two[key] == pytest.approx(one[key], rel=1e-2), key


# ---------------------------------------------------------------------------------------------------------------
# static shapes: torch.compile compiles once per mode


def test_every_rank_has_the_same_number_of_r_neq_t_rows_at_every_step():
    """The rows with r != t are a fixed pattern of the row's index in the global batch, so each rank's count (the
    batch size of the derivative forward) never changes from one micro-batch to the next, and N ranks x B rows get
    the rows of one process x N B."""
    from mmf_diffusers import TimeSampler

    for pair_rows, fraction, batch, ranks in ((False, 0.25, 8, 4), (False, 0.3, 6, 3), (True, 0.25, 8, 2),
                                              (True, 0.5, 4, 3)):
        sampler = TimeSampler(r_neq_t_fraction=fraction, pair_rows=pair_rows)
        generator = torch.Generator().manual_seed(0)
        counts = set()
        for _ in range(5):  # micro-batches
            state = generator.get_state()
            whole = train_mmf.draw_loss_randomness(sampler, generator, slice(0, batch * ranks), (1, 2, 2), "cpu",
                                                   torch.float32)
            per_rank = []
            for rank in range(ranks):
                generator.set_state(state)
                t, r, noise, _ = train_mmf.draw_loss_randomness(sampler, generator, slice(rank * batch, (rank + 1) *
                                                                                         batch), (1, 2, 2), "cpu",
                                                                torch.float32)
                assert torch.equal(t, whole[0][rank * batch:(rank + 1) * batch])
                assert torch.equal(noise, whole[2][rank * batch:(rank + 1) * batch])
                per_rank.append(int((t > r).sum()))
                if pair_rows:  # r != t only on even rows 2j, whose partner 2j + 1 has r = t
                    assert bool((t[1::2] == r[1::2]).all())
            counts.add(tuple(per_rank))
        assert len(counts) == 1, (pair_rows, fraction, counts)
        assert sum(next(iter(counts))) == int(fraction * batch * ranks + 0.5)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_torch_compile_compiles_each_mode_once(tmp_path, precision, fresh_accelerate, monkeypatch):
    """--torch_compile through the script with a counting backend (torch._dynamo's CompileCounter, which runs the
    graphs eagerly): 3 steps compile exactly 2 UNet graphs, the main forward (with gradient, under autocast with bf16)
    and the finite difference's shifted forward (no gradient, float32, the r != t rows), and nothing recompiles."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: real_compile(model, backend=counter))
    torch._dynamo.reset()
    try:
        records = run(tmp_path / "run", "--torch_compile", "--mixed_precision", precision, steps=3)
    finally:
        torch._dynamo.reset()
    assert sorted(records) == [1, 2, 3]
    assert counter.frame_count == 2, counter.frame_count
