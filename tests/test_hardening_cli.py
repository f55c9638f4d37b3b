"""Bad inputs to every command, round three: each ends in one clear line and a non-zero exit (no traceback), nothing
that can grow without limit is accepted, an output folder of an earlier run is not picked up silently, an
interrupted training run leaves nothing half-written and says how to resume, and pushing sends only the folder's
own files and echoes names as data.

Table-driven, in-process (``main([...])`` and capsys) wherever the process boundary does not matter; subprocesses
only for signals and for the training script's own runs. Tiny pipelines on CPU.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SRC = str(REPO / "src")
TRAINING = REPO / "training"
sys.path.insert(0, str(TRAINING))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import output_dir as out_dir  # noqa: E402
from hub_server import HubServer  # noqa: E402
from mmf_diffusers import MMFPipeline, MMFScheduler, build_mmf_unet  # noqa: E402

TOKEN = "hf_hardcli" + "0123456789abcdef" * 2
USER = "tester"
TINY_TRAIN = ["--dataset_name", "sklearn-digits", "--resolution", "8", "--block_out_channels", "8", "16",
              "--norm_num_groups", "4", "--train_batch_size", "8", "--logger", "none", "--num_sample_images", "4",
              "--lr_warmup_steps", "0"]


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "MMF_TEST"))}
    out.update(OMP_NUM_THREADS="1", PYTHONPATH=SRC, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    out.update(extra)
    return out


def save_tiny(folder: Path, **unet_overrides) -> Path:
    torch.manual_seed(0)
    unet = build_mmf_unet(sample_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4)
    MMFPipeline(unet.eval(), MMFScheduler()).save_pretrained(str(folder))
    if unet_overrides:
        config = json.loads((folder / "unet" / "config.json").read_text())
        config.update(unet_overrides)
        (folder / "unet" / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """A good pipeline folder and folders that load but cannot be sampled from."""
    from diffusers import DDPMScheduler

    root = tmp_path_factory.mktemp("cli")
    good = save_tiny(root / "pipe")
    size = save_tiny(root / "pipe-size", sample_size=9)  # 9 -> 5 -> 10: does not go through two levels
    ddpm = save_tiny(root / "pipe-ddpm")
    shutil.rmtree(ddpm / "scheduler")
    DDPMScheduler().save_pretrained(str(ddpm / "scheduler"))
    index = json.loads((ddpm / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "DDPMScheduler"]
    (ddpm / "model_index.json").write_text(json.dumps(index))
    return {"good": good, "size": size, "ddpm": ddpm, "root": root}


def run_main(fn, argv, capsys):
    """(exit status, stderr) of ``fn(argv)``, whether it returns or raises SystemExit."""
    try:
        code = fn(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def assert_one_line(err: str, message: str, argv=None):
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert "Traceback" not in err, (argv, err[-3000:])
    assert len(lines) == 1 and message in lines[0], (argv, err[-3000:])


class Payload:
    """Unpickling this runs os.system: a crafted file must be refused before that."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------------------------- mmf-generate
GENERATE_CASES = [
    (["--seed", "99999999999999999999999"], 2, "a seed must be between 0 and 2**63 - 1"),
    (["--seed", "-1"], 2, "a seed must be between 0 and 2**63 - 1"),
    (["--device", "bogus"], 2, "--device 'bogus' is not a torch device"),
    (["--device", "cuda:x"], 2, "is not a torch device"),
    (["--steps", "100000"], 2, "--steps must be <= 1000"),
    (["--num-images", "1000000000"], 2, "--num-images must be <= 10000"),
    ("size", 2, "sample_size 9 cannot go through its 2 levels"),
    ("ddpm", 2, "its scheduler is a DDPMScheduler, not the MMFScheduler"),
]
if not torch.cuda.is_available():
    GENERATE_CASES.append((["--device", "cuda"], 2, "--device cuda: this torch build has no CUDA"
                           if torch.version.cuda is None else "--device cuda: no cuda device is available"))


@pytest.mark.parametrize("argv, status, message", GENERATE_CASES)
def test_generate_refuses_in_one_line(folders, tmp_path, capsys, argv, status, message):
    from mmf_diffusers import generate

    pipeline = folders[argv] if isinstance(argv, str) else folders["good"]
    extra = [] if isinstance(argv, str) else argv
    out = tmp_path / "grid.png"
    code, err = run_main(generate.main, ["--pipeline", str(pipeline), "--output", str(out), *extra], capsys)
    assert code == status, err
    assert_one_line(err, message, argv)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------- mmf-evaluate
def evaluate_cases(root: Path) -> list:
    """(argv, environment, status, message) for mmf-evaluate; files made under ``root``."""
    marker = root / "pwned"
    crafted = root / "crafted.pkl.gz"
    crafted.write_bytes(gzip.compress(pickle.dumps(((Payload(marker), [0]),) * 3, protocol=2)))
    garbage = root / "garbage.pkl.gz"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    from mmf_diffusers.evaluation import MNISTCNNFeatures

    name = f"mnistcnn-{MNISTCNNFeatures().fingerprint}_sklearn-digits_n20_8px.npz"
    corrupt, pickled, shaped = root / "cache-corrupt", root / "cache-pickled", root / "cache-shaped"
    for folder in (corrupt, pickled, shaped):
        folder.mkdir()
    (corrupt / name).write_bytes(b"PK\x03\x04 not a zip archive")
    np.savez(pickled / name, mu=np.array([Payload(marker)], dtype=object), sigma=np.zeros(3))
    np.savez(shaped / name, mu=np.zeros(5), sigma=np.zeros((5, 5)))
    (root / "a-file").write_text("x")
    cache20 = ["--num-images", "20", "--reference", "sklearn-digits", "--reference-size", "20", "--stats-cache"]
    digits = ["--reference", "sklearn-digits"]
    return [
        (["--num-images", "4", "--reference", "mnist-test"], {"MMF_MNIST_PATH": str(crafted)}, 2,
         "the pickle asks for posix.system"),
        (["--num-images", "4", "--reference", "mnist-test"], {"MMF_MNIST_PATH": str(garbage)}, 2,
         "is not a readable MNIST pickle"),
        (cache20 + [str(corrupt)], {}, 2, "are unreadable (BadZipFile"),
        (cache20 + [str(pickled)], {}, 2, "Object arrays cannot be loaded when allow_pickle=False"),
        (cache20 + [str(shaped)], {}, 2, "not float [128] and [128, 128]"),
        (["--stats-cache", str(root / "a-file")] + digits, {}, 2, "is a file, not a folder"),
        (["--num-images", "4", "--reference-size", "5000"] + digits, {}, 2,
         "--reference-size 5000 is more than the 1797 images of sklearn-digits"),
        (["--num-images", "1800", "--metric", "swd-pixels"] + digits, {}, 2, "needs at least as many reference images"),
        (["--num-images", "4", "--steps", "10000000"] + digits, {}, 2, "--steps must be <= 1000"),
        (["--num-images", "1000000000"] + digits, {}, 2, "--num-images must be <= 50000"),
        (["--batch-size", "100000"] + digits, {}, 2, "--batch-size must be <= 4096"),
        (["--steps", *["1"] * 17] + digits, {}, 2, "the number of --steps values must be <= 16"),
        (["--seed", "99999999999999999999999"] + digits, {}, 2, "a seed must be between 0 and 2**63 - 1"),
        (["--device", "bogus"] + digits, {}, 2, "is not a torch device"),
    ]


def test_evaluate_refuses_in_one_line(folders, tmp_path, capsys, monkeypatch):
    from mmf_diffusers import evaluation

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cases = evaluate_cases(tmp_path)
    for argv, environment, status, message in cases:
        with monkeypatch.context() as m:
            for key, value in environment.items():
                m.setenv(key, value)
            out = tmp_path / "e.json"
            code, err = run_main(evaluation.main, ["--pipeline", str(folders["good"]), "--steps", "1", "--output",
                                                   str(out), *argv], capsys)
        assert code == status, (argv, err)
        assert_one_line(err, message, argv)
        assert not out.exists()
    assert not (tmp_path / "pwned").exists()  # neither the MNIST pickle nor the cached one ran


def test_evaluate_does_not_replace_a_result_unless_asked(folders, tmp_path, capsys, monkeypatch):
    from mmf_diffusers import evaluation

    monkeypatch.chdir(tmp_path)
    Path("evaluation.json").write_text("keep")
    argv = ["--pipeline", str(folders["good"]), "--num-images", "4", "--steps", "1", "--metric", "swd-pixels",
            "--reference", "sklearn-digits"]
    code, err = run_main(evaluation.main, argv, capsys)
    assert code == 2
    assert_one_line(err, "--output evaluation.json exists; pass --overwrite to replace it")
    assert Path("evaluation.json").read_text() == "keep"
    assert evaluation.main(argv + ["--overwrite"]) == 0
    assert json.loads(Path("evaluation.json").read_text())["rows"][0]["steps"] == 1
    assert not list(tmp_path.glob("*.tmp*"))


def test_the_bounds_are_documented_in_help(capsys):
    from mmf_diffusers import demo, evaluation, generate

    for fn, words in [(generate.main, ["at most 10000", "at most 1000", "2**63 - 1"]),
                      (evaluation.main, ["at most 50000", "at most 1000", "at most 4096", "--overwrite",
                                         "sklearn-digits 1797"]),
                      (demo.main, ["at most 64 images", "at most 600"])]:
        with pytest.raises(SystemExit):
            fn(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        for word in words:
            assert word in text, (fn.__module__, word)


# --------------------------------------------------------------------------------------------------- Hub limits
@pytest.fixture
def refused_endpoint():
    """A port nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_endpoint():
    """A port that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.mark.parametrize("value, ok", [("30", True), ("600", True), ("601", False), ("1e12", False),
                                       ("inf", False), ("0", False), ("x", False)])
def test_the_hub_timeout_is_bounded(monkeypatch, value, ok):
    from mmf_diffusers.hub_timeouts import MAX_TIMEOUT, hub_timeout

    monkeypatch.setenv("MMF_HUB_TIMEOUT", value)
    if ok:
        assert hub_timeout() == float(value) <= MAX_TIMEOUT
    else:
        with pytest.raises(ValueError, match="MMF_HUB_TIMEOUT"):
            hub_timeout()


def hub_at(monkeypatch, url: str) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.mark.parametrize("what", ["refused", "silent", "missing", "timeout-env"])
@pytest.mark.parametrize("command", ["mmf-demo", "mmf-generate"])
def test_an_unreachable_hub_id_fails_fast_in_one_line(what, command, refused_endpoint, silent_endpoint, tmp_path,
                                                      capsys, monkeypatch):
    """One request, no retries with back-off: the answer comes within the time limit."""
    from mmf_diffusers import demo, generate

    monkeypatch.setenv("MMF_HUB_TIMEOUT", "1e12" if what == "timeout-env" else "1")
    server = HubServer({TOKEN: USER}).start() if what == "missing" else None
    try:
        hub_at(monkeypatch, server.url if server else silent_endpoint if what == "silent" else refused_endpoint)
        argv = ["--pipeline", f"{USER}/missing"]
        fn = demo.main if command == "mmf-demo" else generate.main
        argv += ["--server-port", str(_free_port())] if command == "mmf-demo" else ["--output", str(tmp_path / "x.png")]
        start = time.time()
        code, err = run_main(fn, argv, capsys)
        took = time.time() - start
    finally:
        if server:
            server.stop()
    message = {"refused": "cannot reach the Hub", "silent": "cannot reach the Hub",
               "missing": f"{USER}/missing is not a repository on the Hub",
               "timeout-env": "is more than the 600 s accepted"}[what]
    assert code in (1, 2)
    assert_one_line(err, message)
    assert took < 10, took  # huggingface_hub's five retries with back-off alone take about 30 s


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------------------ mmf-demo
def test_demo_refuses_a_bad_device_before_loading(folders, capsys, monkeypatch):
    import mmf_diffusers.demo as demo

    monkeypatch.setattr(demo, "build_demo", lambda *a, **k: pytest.fail("the model was loaded"))
    for device, message in [("bogus", "is not a torch device"), ("cuda:x", "is not a torch device")]:
        code, err = run_main(demo.main, ["--pipeline", str(folders["good"]), "--device", device, "--server-port",
                                         str(_free_port())], capsys)
        assert code == 2
        assert_one_line(err, message, device)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "inf", "1e999", None, True,
                                   [1], {"n": 1}, 1e300, 2.5])
def test_demo_requests_with_bad_numbers_are_readable_errors(folders, value):
    from mmf_diffusers.demo import ImageDemo, load_demo

    model = load_demo(str(folders["good"]))
    assert isinstance(model, ImageDemo)
    for position in (1, 2, 3):  # the number of images, the steps, the seed
        request = ["none", 2, 1, 0]
        request[position] = value
        with pytest.raises(ValueError, match="must be (a whole number|between)"):
            model.generate(*request)
    if isinstance(value, float) or value in ("nan", "inf", "1e999"):
        with pytest.raises(ValueError, match="guidance"):
            model.generate("none", 2, 1, 0, value)


@pytest.mark.slow  # about 10 s: gradio's server
def test_demo_api_answers_nan_and_infinity_with_a_readable_error(folders):
    """JSON has no NaN: gradio_client refuses to send one, but a raw HTTP client can (Python's json writes NaN and
    Infinity). The server answers each with the field's message as an error event, not a server-side failure."""
    import httpx

    from mmf_diffusers.demo import build_demo

    demo = build_demo(str(folders["good"]))
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True,
                            ssr_mode=False)
    try:
        for body, message in [('["none", NaN, 1, 0, ""]', "the number of images must be a whole number, got nan"),
                              ('["none", Infinity, 1, 0, ""]', "the number of images must be a whole number, got inf"),
                              ('["none", 2, -Infinity, 0, ""]', "steps must be a whole number, got -inf"),
                              ('["none", 2, 1, 1e999, ""]', "the seed must be a whole number, got inf"),
                              ('["none", 2, 1, 0, NaN]', "guidance"),
                              ('["none", "2", 1, 0, ""]', None)]:
            response = httpx.post(url + "gradio_api/call/generate", content='{"data": ' + body + "}",
                                  headers={"content-type": "application/json"}, timeout=30)
            assert response.status_code == 200, (body, response.text)
            result = httpx.get(url + f"gradio_api/call/generate/{response.json()['event_id']}", timeout=60).text
            if message is None:
                assert "event: complete" in result, (body, result)
            else:
                assert "event: error" in result and message in result, (body, result)
                assert "Traceback" not in result
    finally:
        demo.close()


# ------------------------------------------------------------------------------------------------------- mmf-push
def test_push_refuses_hard_links_and_bad_ids_and_echoes_names_as_data(tmp_path, capsys, monkeypatch):
    from mmf_diffusers import hub

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": 1}')
    linked = save_tiny(tmp_path / "linked")
    os.link(secret, linked / "unet" / "extra.json")
    weights = linked / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ValueError, match="extra.json has 2 hard links"):
        hub.pipeline_files(str(linked))
    cases = [
        ([str(linked), f"{USER}/x"], "unet/extra.json has 2 hard links"),
        ([str(linked), "--space-id", f"{USER}/x\n# Injected heading", "--with-demo", f"{USER}/x"],
         "--space-id 'tester/x\\n# Injected heading' is not a valid repository id"),
        ([str(linked), f"{USER}/x--y.."], "REPO_ID 'tester/x--y..' is not a valid repository id"),
        ([str(linked), "a/b/c"], "is not a valid repository id"),
        ([str(linked), f"{USER}/x", "--with-demo", "--space-id", "no-namespace"], "must be user/name"),
    ]
    for argv, message in cases:
        code, err = run_main(hub.main, argv, capsys)
        assert code == 2, (argv, err)
        assert_one_line(err, message, argv)
    os.remove(linked / "unet" / "extra.json")
    assert os.lstat(weights).st_nlink == 1

    # A folder whose name holds a newline and a terminal escape: the lines printed after the push carry it as data.
    odd = tmp_path / "odd\nname\x1b[31m"
    shutil.copytree(linked, odd)
    with HubServer({TOKEN: USER}) as server:
        assert hub.main([str(odd), f"{USER}/odd", "--endpoint", server.url, "--with-demo", "--demo-dir",
                         str(tmp_path / "space")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "odd\nname" not in out and "odd\\nname" in out
    lines = out.strip().splitlines()
    assert len(lines) == 3 and lines[2].strip().startswith(f"hf upload {USER}/odd-demo ")


def test_printable_escapes_what_could_start_a_line():
    from mmf_diffusers.hub import printable

    assert printable("a\nb\rc\x1b[2Jd\te f") == "a\\nb\\rc\\x1b[2Jd\\te f"
    assert printable("plain text / path") == "plain text / path"


# ----------------------------------------------------------------------------------------- training: arguments
def make_checkpoint(folder: Path, step: int, config=True, max_steps: int = 4) -> Path:
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    meta = {"global_step": step, "global_batch_size": 8, "num_samples": 1797, "use_ema": False}
    if config:
        meta["config"] = {"seed": 0, "max_train_steps": max_steps}
    (checkpoint / "training_state.json").write_text(json.dumps(meta))
    return checkpoint


def training_argument_cases(root: Path) -> list:
    (root / "a-file").write_text("x")
    noconfig = make_checkpoint(root / "noconfig", 4, config=False)
    return [
        (["--dataset_name", "sklearn-digit"], "did you mean 'sklearn-digits'?"),
        (["--dataset_name", "sklearn_digits"], "did you mean 'sklearn-digits'?"),
        (["--dataset_name", "MNIST-offline"], "did you mean 'mnist-offline'?"),
        (["--dataset_name", "mnist-ofline"], "did you mean 'mnist-offline'?"),
        (["--dataset_name", "sklearn-digits", "--output_dir", str(root / "a-file")], "is a file, not a folder"),
        (["--dataset_name", "sklearn-digits", "--output_dir", ""], "--output_dir is empty"),
        (["--dataset_name", "sklearn-digits", "--output_dir", " "], "--output_dir is empty"),
        (["--dataset_name", "sklearn-digits", "--output_dir", str(root / "a-file" / "run")],
         "cannot be created"),
        (["--dataset_name", "sklearn-digits", "--output_dir", str(root / "run"), "--overwrite_output_dir",
          "--resume_from_checkpoint", "latest"], "give one"),
        (["--dataset_name", "sklearn-digits", "--output_dir", str(root / "noconfig"), "--resume_from_checkpoint",
          str(noconfig)], "training_state.json lacks 'config'"),
    ]


def test_training_argument_mistakes_are_one_line_and_need_no_network(tmp_path, capsys, monkeypatch):
    import train_mmf

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the Hub was asked"))
    for argv, message in training_argument_cases(tmp_path):
        code, err = run_main(train_mmf.main, argv, capsys)
        assert code == 2, (argv, err)
        assert_one_line(err, message, argv)


def test_a_checkpoint_without_config_is_skipped_by_latest(tmp_path):
    import run_state

    import mmf_diffusers.checkpointing as ckpt

    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4, config=False)
    skipped = []
    found = ckpt.latest_checkpoint(str(tmp_path), metadata_check=run_state.metadata_problem,
                                   on_skip=lambda path, why: skipped.append(why))
    assert found.endswith("checkpoint-2") and "lacks 'config'" in skipped[0]
    for meta, message in [([], "not a JSON object"), ({"global_step": 4}, "lacks 'global_batch_size'"),
                          ({"global_step": True, "global_batch_size": 8, "num_samples": 1, "use_ema": False,
                            "config": {}}, "'global_step' of type bool"),
                          ({"global_step": 4, "global_batch_size": 8, "num_samples": 1, "use_ema": False,
                            "config": {}}, "no integer 'seed'")]:
        assert message in run_state.metadata_problem(meta)


# --------------------------------------------------------------------------------------- training: stale state
def fake_earlier_run(folder: Path, steps=(2, 4), max_steps: int = 4) -> Path:
    """What a finished run leaves (only the names matter to the checks), plus a file of the user's own."""
    for step in steps:
        make_checkpoint(folder, step, max_steps=max_steps)
    save_tiny(folder)
    for name in ("samples/step-000004-1step.png", "logs/train_log.jsonl", "training_config.json", "README.md",
                 "sample_grid.png", ".tmp-checkpoint-6/model.safetensors", "latent_cache/latents.safetensors",
                 "notes.txt"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("x")
    return folder


@pytest.mark.parametrize("resume, overwrite, refused", [
    (None, False, "holds the checkpoints of an earlier run (checkpoint-2, checkpoint-4; finished)"),
    ("latest", False, None),
    ("other", False, "is not one of them"),
    ("checkpoint-2", False, "holds checkpoints newer than checkpoint-2 (checkpoint-4)"),
    ("checkpoint-4", False, None),
    (None, True, None),
    ("checkpoint-2", True, None),
])
def test_an_earlier_run_is_refused_unless_the_command_says_what_to_do(tmp_path, resume, overwrite, refused):
    run = fake_earlier_run(tmp_path / "run")
    other = make_checkpoint(tmp_path / "elsewhere", 3)
    path = str(other) if resume == "other" else str(run / resume) if resume and resume != "latest" else resume
    if refused:
        with pytest.raises(out_dir.EarlierRun, match=refused.replace("(", r"\(").replace(")", r"\)")):
            out_dir.check_earlier_run(str(run), path, overwrite)
        return
    out_dir.check_earlier_run(str(run), path, overwrite)
    if overwrite:
        removed = out_dir.clear_earlier_run(str(run), keep=path, logging_dir="logs")
        left = sorted(p.name for p in run.iterdir())
        if resume is None:  # everything of the earlier run goes, the user's file and the latent cache stay
            assert left == ["latent_cache", "notes.txt"], left
            assert removed[:2] == ["checkpoint-2", "checkpoint-4"]
        else:  # the resumed checkpoint's run stays; only the newer checkpoint goes
            assert removed == ["checkpoint-4"] and "checkpoint-2" in left and "unet" in left


def test_a_folder_with_only_a_pipeline_or_a_log_is_an_earlier_run_too(tmp_path):
    assert out_dir.describe_earlier_run(str(tmp_path / "missing")) is None
    (tmp_path / "notes.txt").write_text("mine")
    assert out_dir.describe_earlier_run(str(tmp_path)) is None
    (tmp_path / "logs").mkdir()
    assert "logs/" in out_dir.describe_earlier_run(str(tmp_path))
    save_tiny(tmp_path / "pipe")
    assert "model_index.json" in out_dir.describe_earlier_run(str(tmp_path / "pipe"))


def run_training(args, timeout=240, **kwargs):
    return subprocess.run([sys.executable, str(TRAINING / "train_mmf.py"), *map(str, args)], env=env(),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.mark.slow
def test_the_script_refuses_an_earlier_run_then_overwrites_it_when_asked(tmp_path):
    run = fake_earlier_run(tmp_path / "run", steps=(2, 4, 6, 8), max_steps=8)
    args = TINY_TRAIN + ["--max_train_steps", "2", "--checkpointing_steps", "2", "--output_dir", run]
    start = time.time()
    refused = run_training(args)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert_one_line(refused.stderr, "holds the checkpoints of an earlier run (checkpoint-2, checkpoint-4, "
                                    "checkpoint-6, checkpoint-8; finished)")
    assert time.time() - start < 30  # before torch is imported
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6",
                                                               "checkpoint-8"]

    result = run_training(args + ["--overwrite_output_dir", "--seed", "0"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--overwrite_output_dir: removed checkpoint-2, checkpoint-4, checkpoint-6, checkpoint-8" in result.stdout
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (run / "notes.txt").read_text() == "x" and (run / "latent_cache").is_dir()
    meta = json.loads((run / "checkpoint-2" / "training_state.json").read_text())
    assert meta["global_step"] == 2 and meta["config"]["seed"] == 0
    assert not list(run.glob(".tmp-*")) and not list(run.glob(".trash-*"))
    # `latest` now resumes this run, and only this one
    resumed = run_training(TINY_TRAIN + ["--max_train_steps", "3", "--checkpointing_steps", "3", "--output_dir", run,
                                         "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0 and "checkpoint-2" in resumed.stdout, resumed.stderr[-3000:]


# ----------------------------------------------------------------------------------------- training: Ctrl-C
@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_saves_nothing_half_written_and_says_how_to_resume(tmp_path, signum, status):
    import mmf_diffusers.checkpointing as ckpt

    run = tmp_path / "run"
    args = TINY_TRAIN + ["--max_train_steps", "100000", "--checkpointing_steps", "3", "--seed", "0",
                         "--output_dir", run]
    # A shell starts background jobs with SIGINT ignored; the child here must see it as a terminal's Ctrl-C does.
    process = subprocess.Popen([sys.executable, str(TRAINING / "train_mmf.py"), *map(str, args)], env=env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = run / "logs" / "train_log.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and process.poll() is None:
        if log.is_file() and log.read_text().count("\n") >= 10:
            break
        time.sleep(0.1)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert last.startswith(f"train_mmf.py: interrupted ({signal.Signals(signum).name}): nothing half-written")
    assert "--resume_from_checkpoint latest" in last
    steps = [step for step, _ in ckpt.list_checkpoints(str(run))]
    assert steps and f"checkpoint-{steps[-1]} (step {steps[-1]})" in last
    assert not list(run.glob(".tmp-*")) and not list(run.glob(".trash-*"))
    for step in steps:  # every checkpoint is whole
        assert ckpt.checkpoint_problem(str(run / f"checkpoint-{step}"), ("model.safetensors", "mmf_state.json")) \
            is None
    assert MMFPipeline.from_pretrained(str(run)).unet is not None  # the pipeline folder loads
    # what the line says works
    resumed = run_training(args[:-2] + ["--max_train_steps", str(steps[-1] + 1), "--output_dir", run,
                                        "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0 and f"checkpoint-{steps[-1]}" in resumed.stdout, resumed.stderr[-3000:]


# ------------------------------------------------------------------------------------- the other training scripts
def test_prepare_data_convert_checkpoint_and_train_vae_refuse_in_one_line(tmp_path, capsys):
    import convert_checkpoint
    import prepare_data
    import train_vae

    (tmp_path / "a-file").write_text("x")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    cases = [
        (prepare_data.main, ["sklearn-digits", str(tmp_path / "a-file")], 2, "is a file, not a folder"),
        (prepare_data.main, ["sklearn-digits", ""], 2, "is empty"),
        (prepare_data.main, ["sklearn-digits", str(tmp_path / "a-file" / "x")], 2, "cannot be created"),
        (convert_checkpoint.main, [str(tmp_path / "nowhere")], 2, "is not a checkpoint folder"),
        (train_vae.main, ["--dataset_name", "sklearn-digit"], 2, "did you mean 'sklearn-digits'?"),
        (train_vae.main, ["--dataset_name", "sklearn-digits", "--output_dir", str(tmp_path / "a-file")], 2,
         "is a file, not a folder"),
        (train_vae.main, ["--dataset_name", "sklearn-digits", "--output_dir", ""], 2, "--output_dir is empty"),
        (train_vae.main, ["--dataset_name", "sklearn-digits", "--output_dir", str(tmp_path / "vae")], 2,
         "already holds a model"),
        (train_vae.main, ["--dataset_name", "sklearn-digits", "--learning_rate", "nan"], 2,
         "--learning_rate must be a positive number"),
        (train_vae.main, ["--dataset_name", "sklearn-digits", "--max_train_steps", "10000000000"], 2,
         "--max_train_steps must be <= 1e+09"),
        (train_vae.main, ["--dataset_name", "sklearn-digits", "--seed", "99999999999"], 2, "--seed must be in"),
    ]
    for fn, argv, status, message in cases:
        code, err = run_main(fn, argv, capsys)
        assert code == status, (argv, err)
        assert_one_line(err, message, argv)


def test_convert_checkpoint_refuses_state_of_the_wrong_shape(tmp_path):
    import convert_checkpoint

    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    for i, state in enumerate(({"current_step": 1}, {"last_epoch": 1}, {"global_step": "one", "micro_batch": 2,
                                                                      "generator": torch.zeros(4, dtype=torch.uint8)})):
        torch.save(state, folder / f"custom_checkpoint_{i}.pkl")
    with pytest.raises(ValueError, match="not the run position"):
        convert_checkpoint.convert(str(folder))
    assert len(list(folder.glob("*.pkl"))) == 3
