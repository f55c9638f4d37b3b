"""The Hub token: never on the command line, read from HF_TOKEN, a file or the login, never uploaded (plain or
encoded); and every Hub call of `mmf-demo` and the generated Space app has the command-line tools' time limit.

* ``train_mmf.py --hub_token T`` and ``mmf-push --token T`` are refused with exit status 2 and one line that does not
  repeat the token, before anything else (a token in argv is readable by every local user for the whole run).
* ``--hub_token_file`` / ``--token-file``: one line of printable ASCII; a missing, non-regular, empty, oversized,
  non-ASCII or multi-word file is a one-line error that does not echo the file's content.
* Before an upload the files are searched for the token in plain and encoded forms (base64 and base64url at every
  alignment, wrapped over lines, hex, URL-encoded, UTF-16) and in the names of the files; a clean folder has no false
  hit.
* Against a Hub that accepts connections and never answers, `mmf-demo`'s loader and the Space's ``app.py`` end with
  an error within the limit set by MMF_HUB_TIMEOUT, as ``mmf-generate`` does.
"""

from __future__ import annotations

import argparse
import base64
import secrets
import shutil
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmf_diffusers import hub_token
from mmf_diffusers.hub import main as push_main
from mmf_diffusers.hub import make_push_fn, push_pipeline_folder

from hub_server import HubServer, token_digest
from test_hub import SRC, USER, hub_env, tiny_pipeline
from test_training import TINY, check, run_script, script_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "training"))

import train_mmf  # noqa: E402

#: Random per run, shaped like a Hub token (hf_ and 34 letters and digits).
TOKEN = "hf_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(34))
RAW = TOKEN.encode()


def all_output_lacks_token(text: str) -> None:
    for name, form in hub_token.encoded_forms(TOKEN).items():
        assert form.decode("latin-1") not in text, f"the token ({name}) is in the output"


@pytest.fixture
def no_login(monkeypatch, tmp_path):
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens") / "pipeline"
    tiny_pipeline().save_pretrained(str(folder))
    return folder


def exit_code(fn, argv) -> int:
    with pytest.raises(SystemExit) as info:
        fn(argv)
    return info.value.code


# ---------------------------------------------------------------------------------------------------- argv
@pytest.mark.parametrize("command, argv", [
    ("mmf-push", ["FOLDER", f"{USER}/x", "--token", TOKEN]),
    ("mmf-push", ["FOLDER", f"{USER}/x", f"--token={TOKEN}"]),
    ("mmf-push", ["FOLDER", f"{USER}/x", "--token", ""]),
    ("train_mmf.py", ["--dataset_name", "sklearn-digits", "--hub_token", TOKEN]),
    ("train_mmf.py", ["--dataset_name", "sklearn-digits", f"--hub_token={TOKEN}", "--push_to_hub"]),
    ("train_mmf.py", ["--dataset_name", "sklearn-digits", "--hub_token", ""]),
])
def test_a_token_on_the_command_line_is_refused_before_anything_else(command, argv, tmp_path, capsys):
    argv = [str(tmp_path / "missing") if a == "FOLDER" else a for a in argv]  # refused before the folder is read
    fn = push_main if command == "mmf-push" else train_mmf.main
    assert exit_code(fn, argv) == 2
    err = capsys.readouterr().err
    flag = "--token" if command == "mmf-push" else "--hub_token"
    assert f"error: {flag} is refused: a token on the command line is readable by every user" in err
    assert "HF_TOKEN" in err and "hf auth login" in err and "Traceback" not in err
    assert err.count("error:") == 1 and err.strip().splitlines()[-1].startswith(f"{command}: error:")
    all_output_lacks_token(err)


def test_the_help_says_why(capsys):
    for fn in (push_main, train_mmf.main):
        assert exit_code(fn, ["--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "REFUSED, with exit status 2" in text or "REFUSED (exit status 2" in text
        assert "--token-file FILE" in text or "--hub_token_file FILE" in text


# ---------------------------------------------------------------------------------------------------- token files
BAD_FILES = {  # name -> (content or None for "make it specially", message)
    "missing": (None, "No such file or directory"),
    "a folder": (None, "is not a regular file"),
    "empty": (b"", "is empty"),
    "whitespace only": (b" \n\t\n", "is empty"),
    "two lines": (RAW + b"\n" + b"hf_secondline0123456789\n", "holds more than one word or line"),
    "two words": (b"token " + RAW, "holds more than one word or line"),
    "non-ASCII": ("hf_tökén".encode(), "holds non-ASCII bytes"),
    "too large": (RAW * 200, "bytes: a token file holds only the token"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_bad_token_file_is_a_one_line_error_that_does_not_echo_it(name, tmp_path, capsys, pipeline_folder, no_login):
    content, message = BAD_FILES[name]
    path = tmp_path / "token"
    if name == "a folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(hub_token.TokenError, match=message):
        hub_token.read_token_file(str(path))
    for fn, argv in ((push_main, [str(pipeline_folder), f"{USER}/x", "--token-file", str(path)]),
                     (train_mmf.main, ["--dataset_name", "sklearn-digits", "--push_to_hub", "--hub_token_file",
                                       str(path)])):
        assert exit_code(fn, argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("error:") == 1, err
        all_output_lacks_token(err)
        assert "secondline" not in err


def test_a_token_file_is_read_and_used(tmp_path, capsys, pipeline_folder, no_login):
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    assert hub_token.read_token_file(str(path)) == TOKEN
    assert hub_token.resolve_token(str(path)) == TOKEN and hub_token.resolve_token(None) is None
    # --hub_token_file without --push_to_hub would be silently unused: refused.
    assert exit_code(train_mmf.main, ["--dataset_name", "sklearn-digits", "--hub_token_file", str(path)]) == 2
    assert "--hub_token_file only make sense with --push_to_hub" in capsys.readouterr().err
    train_mmf.parse_args(["--dataset_name", "sklearn-digits", "--push_to_hub", "--hub_token_file", str(path)])
    folder = str(tmp_path / "pipeline")
    shutil.copytree(pipeline_folder, folder)
    with HubServer({TOKEN: USER}) as hub:
        assert push_main([folder, f"{USER}/from-file", "--token-file", str(path), "--endpoint", hub.url]) == 0
        # What train_mmf.py calls: the token comes from args.hub_token_file.
        args = argparse.Namespace(push_to_hub=True, hub_model_id=f"{USER}/from-args", hub_token_file=str(path),
                                  hub_endpoint=hub.url)
        make_push_fn(args, validate=True)(folder, "from a file")
        writes = hub.requests_to("POST", "/commit/")
    assert len(writes) == 2 and all(r["token_sha256"] == token_digest(TOKEN) for r in writes)
    all_output_lacks_token("".join(capsys.readouterr()))


@pytest.mark.slow
def test_the_training_script_pushes_with_a_token_file(tmp_path):
    """train_mmf.py --push_to_hub --hub_token_file, as launched: the pushes carry the file's token, which appears in
    no output and no file written (plain or encoded)."""
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    out = tmp_path / "out"
    with HubServer({TOKEN: USER}) as hub:
        env = dict(script_env(tmp_path), **{k: v for k, v in hub_env(hub, str(tmp_path), token=None).items()
                                            if k.startswith("HF_")})
        env.pop("HF_HUB_OFFLINE", None)
        result = run_script(tmp_path, ["--dataset_name", "sklearn-digits", *TINY, "--train_batch_size", "8",
                                       "--max_train_steps", "1", "--logger", "none", "--output_dir", out,
                                       "--push_to_hub", "--hub_model_id", f"{USER}/by-file", "--hub_token_file",
                                       path], env=env)
        check(result)
        writes = hub.requests_to("POST", "/commit/")
    assert writes and all(r["token_sha256"] == token_digest(TOKEN) for r in writes)
    all_output_lacks_token(result.stdout + result.stderr)
    assert TOKEN not in (out / "training_config.json").read_text()
    assert hub_token.token_leaks(str(out), [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()],
                                 TOKEN) == []


# ---------------------------------------------------------------------------------------------------- encoded forms
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


ENCODED = {  # name -> the text that lands in a pushed file
    "plain": TOKEN,
    "base64": b64(RAW),
    "base64 in a longer blob (alignment 1)": b64(b"u:" + RAW + b"!"),
    "base64 in a longer blob (alignment 2)": b64(b"user=" + RAW),
    "base64url without padding": base64.urlsafe_b64encode(b"\xfb\xff" + RAW).decode().rstrip("="),
    "base64 wrapped at 76 columns": base64.encodebytes(b"x" * 40 + RAW + b"y" * 40).decode(),
    "hex": RAW.hex(),
    "hex, upper case": RAW.hex().upper(),
    "URL-encoded, every byte": "".join(f"%{b:02X}" for b in RAW),
    "URL-encoded, lower case": "".join(f"%{b:02x}" for b in RAW),
}


@pytest.mark.parametrize("name", list(ENCODED))
def test_an_encoded_token_in_a_file_is_found_and_not_uploaded(name, tmp_path, pipeline_folder):
    folder = tmp_path / "pipeline"
    shutil.copytree(pipeline_folder, folder)
    config = folder / "scheduler" / "scheduler_config.json"
    text = config.read_text()
    config.write_text(text.replace("{", "{\n  \"note\": " + repr(ENCODED[name]).replace("'", '"') + ",", 1))
    leaks = hub_token.token_leaks(str(folder), ["scheduler/scheduler_config.json", "unet/config.json"], TOKEN)
    assert len(leaks) == 1 and leaks[0].startswith("scheduler/scheduler_config.json ("), leaks
    with pytest.raises(ValueError, match="the Hub token appears in .*scheduler_config.json") as error:
        push_pipeline_folder(str(folder), f"{USER}/leak", token=TOKEN, endpoint="http://127.0.0.1:9")
    all_output_lacks_token(str(error.value))


def test_utf16_and_file_names_are_searched_too(tmp_path, pipeline_folder):
    folder = tmp_path / "pipeline"
    shutil.copytree(pipeline_folder, folder)
    (folder / "README.md").write_bytes("notes: ".encode("utf-16-le") + TOKEN.encode("utf-16-le"))
    (folder / "unet" / f"{RAW.hex()}.json").write_text("{}")
    leaks = hub_token.token_leaks(str(folder), ["README.md", f"unet/{RAW.hex()}.json"], TOKEN)
    assert leaks == ["README.md (UTF-16-LE)", f"unet/{RAW.hex()}.json (its name: hex)"]


def test_a_clean_folder_has_no_false_hit(pipeline_folder):
    """Random weights and configs, and the shipped pipelines: a fresh random token in no form."""
    for folder in (pipeline_folder, REPO / "pipelines" / "mmf-digits"):
        files = [str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()]
        for _ in range(3):
            token = "hf_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(34))
            assert hub_token.token_leaks(str(folder), files, token) == [], folder


def test_mmf_push_refuses_an_encoded_token_and_uploads_nothing(tmp_path, pipeline_folder, capsys, monkeypatch,
                                                               no_login):
    folder = tmp_path / "pipeline"
    shutil.copytree(pipeline_folder, folder)
    (folder / "unet" / "config.json").write_text((folder / "unet" / "config.json").read_text().replace(
        "{", '{\n  "_auth": "' + b64(b"Bearer " + RAW) + '",', 1))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with HubServer({TOKEN: USER}) as hub:
        assert exit_code(push_main, [str(folder), f"{USER}/leak", "--endpoint", hub.url]) == 1
        assert hub.requests_to("POST", "/commit/") == [] and f"{USER}/leak" not in hub.repos
    err = capsys.readouterr().err
    assert "Refusing to upload" in err and "unet/config.json (base64 (alignment" in err and err.count("\n") == 1
    all_output_lacks_token(err)


# ---------------------------------------------------------------------------------------------------- timeouts
@pytest.fixture
def silent_hub():
    """A Hub endpoint that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.mark.slow
def test_the_space_app_gives_up_on_a_silent_hub(silent_hub, tmp_path):
    """The generated app.py (build_demo -> load_demo -> hub.load_pipeline, the loader of mmf-demo too), with
    MMF_HUB_TIMEOUT=1: the load ends with one clear error after one request of 1 s (hub_timeouts.hub_preflight);
    before, hf_hub_download tried the model index six times, each try after the first waiting 60 s (about 400 s in
    all), which the subprocess's 240 s would cut."""
    from mmf_diffusers.space import write_space

    env = hub_env(argparse.Namespace(url=silent_hub), str(tmp_path), token=None, pythonpath=SRC)
    env.update(MMF_HUB_TIMEOUT="1", OMP_NUM_THREADS="1")
    write_space(str(tmp_path / "space"), "tester/tiny")
    assert "use_hub_timeouts()" in (tmp_path / "space" / "app.py").read_text()
    start = time.time()
    result = subprocess.run([sys.executable, str(tmp_path / "space" / "app.py")], env=env, cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("The demo of tester/tiny cannot start: Cannot load tester/tiny: cannot reach the Hub"), last
    assert "no answer within 1 s: MMF_HUB_TIMEOUT sets the limit" in last
    assert "Retrying" not in result.stderr  # one request, not huggingface_hub's five retries with back-off
    assert time.time() - start < 120
