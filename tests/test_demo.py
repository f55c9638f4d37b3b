"""Tests for ``mmf-demo`` (`mmf_diffusers.demo`): the Gradio app served on 127.0.0.1 and called through the real
`gradio_client.Client`, with tiny random pipelines saved to ``tmp_path`` (CPU, float32).

An unconditional `MMFPipeline` (the tiny UNet of tests/test_pipeline.py), a class-conditional one (tests/test_conditional.py's
builder, label embeddings randomised so that labels change the output) and a tiny `MMFTrajectoryPipeline`. Each app
runs in this process, on a free port, without blocking (``prevent_thread_lock``). Skipped where gradio is not installed.
"""

import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from mmf_diffusers import MMFPipeline, MMFScheduler, MMFTrajectoryPipeline, add_class_conditioning, build_mmf_unet  # noqa: E402
from mmf_diffusers.demo import NO_LABEL, build_demo, main, parse_start_state, write_space  # noqa: E402
from mmf_diffusers.unet1d import build_mmf_unet1d  # noqa: E402

# gradio 6.31's queue calls pandas options that pandas 3 deprecates; nothing of ours.
pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]

SIZE = 8
NAMES = ["cat", "dog", "fox"]


def unconditional_folder(path):
    torch.manual_seed(0)
    unet = build_mmf_unet(sample_size=SIZE, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4)
    MMFPipeline(unet, MMFScheduler()).save_pretrained(path)
    return str(path)


def conditional_folder(path):
    torch.manual_seed(0)
    unet = build_mmf_unet(sample_size=SIZE, in_channels=1, block_out_channels=(16, 16))
    unet, conditioner = add_class_conditioning(unet, len(NAMES), class_names=NAMES)
    with torch.no_grad():  # at initialisation the label embedding is zero: give the labels something to say
        weight = conditioner.label_embedding.weight
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    MMFPipeline(unet, MMFScheduler(), conditioner=conditioner).save_pretrained(path)
    return str(path)


def trajectory_folder(path):
    torch.manual_seed(0)
    unet = build_mmf_unet1d(2, 16, block_out_channels=(8, 16))
    MMFTrajectoryPipeline(unet, MMFScheduler(), channel_mean=[0.0, 1.0], channel_std=[1.0, 2.0],
                          channel_names="theta,omega").save_pretrained(path)
    return str(path)


def serve(folder):
    demo = build_demo(folder)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True,
                            ssr_mode=False)
    return demo, gradio_client.Client(url, verbose=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """name -> (the gradio Blocks, a gradio_client.Client connected to it)."""
    root = tmp_path_factory.mktemp("demo")
    apps = {name: serve(make(root / name)) for name, make in
            [("unconditional", unconditional_folder), ("conditional", conditional_folder),
             ("trajectory", trajectory_folder)]}
    yield apps
    for demo, _ in apps.values():
        demo.close()


@pytest.fixture(scope="module")
def apps(served):
    return {name: client for name, (_, client) in served.items()}


def test_class_and_guidance_fields_only_for_class_conditional_models(served):
    def fields(name):
        return {block.label: block for block in served[name][0].blocks.values() if getattr(block, "label", None)}

    conditional, unconditional, trajectory = fields("conditional"), fields("unconditional"), fields("trajectory")
    assert conditional["Class"].visible and conditional["Guidance scale (optional)"].visible
    assert conditional["Class"].choices == [(c, c) for c in ["each class in turn", *NAMES, NO_LABEL]]
    assert not unconditional["Class"].visible and not unconditional["Guidance scale (optional)"].visible
    assert not trajectory["Class"].visible and trajectory["Start state (theta, omega), optional"].visible
    assert (unconditional["Steps (network evaluations)"].minimum, unconditional["Steps (network evaluations)"].maximum) \
        == (1, 8)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def generate(client, *args):
    return pixels(client.predict(*args, api_name="/generate"))


def test_unconditional_same_seed_same_image_and_the_grid(apps, tmp_path):
    client = apps["unconditional"]
    first = generate(client, NO_LABEL, 4, 1, 0)
    assert np.array_equal(first, generate(client, NO_LABEL, 4, 1, 0))
    assert not np.array_equal(first, generate(client, NO_LABEL, 4, 1, 1))
    # The grid is what the pipeline gives for that seed, tiled 2 x 2, each 8 x 8 image upscaled to 128 px.
    pipe = MMFPipeline.from_pretrained(unconditional_folder(tmp_path / "again"))
    images = pipe(num_images=4, generator=torch.Generator().manual_seed(0)).images
    assert first.shape == (2 + 2 * (128 + 2), 2 + 2 * (128 + 2))
    tile = first[2:130, 2:130]
    assert np.array_equal(tile[::16, ::16], np.asarray(images[0]))


def test_conditional_labels_change_the_output(apps):
    client = apps["conditional"]
    cats = generate(client, "cat", 3, 1, 0)
    assert np.array_equal(cats, generate(client, "cat", 3, 1, 0))
    assert not np.array_equal(cats, generate(client, "dog", 3, 1, 0))
    assert not np.array_equal(cats, generate(client, NO_LABEL, 3, 1, 0))
    assert not np.array_equal(cats, generate(client, "cat", 3, 2, 0))
    guided = pixels(client.predict("cat", 3, 1, 0, "2.0", api_name="/generate"))
    assert not np.array_equal(cats, guided)
    # Each class in turn: the grid's first image is the cat of a batch of cats with the same noise.
    mixed = generate(client, "each class in turn", 3, 1, 0)
    assert np.array_equal(mixed[2:130, 2:130], cats[2:130, 2:130])
    assert not np.array_equal(mixed, cats)


@pytest.mark.parametrize("args, message", [
    (("cat", 0, 1, 0), "the number of images must be between 1 and 64, got 0"),
    (("cat", 2, 9, 0), "steps must be between 1 and 8, got 9"),
    (("cat", 2, 0, 0), "steps must be between 1 and 8, got 0"),
    (("cat", 2.5, 1, 0), "the number of images must be a whole number, got 2.5"),
    (("wolf", 2, 1, 0), "unknown class 'wolf'; this model knows ['cat', 'dog', 'fox'] (and 'none')"),
    (("cat", 2, 1, -1), "the seed must be between 0"),
    (("cat", 2, 1, 0, "lots"), "the guidance scale must be a number (or empty), got 'lots'"),
    ((NO_LABEL, 2, 1, 0, "2"), "`guidance_scale` needs class labels"),  # the pipeline's own message
])
def test_bad_input_is_a_readable_error(apps, args, message):
    with pytest.raises(gradio_client.exceptions.AppError) as error:
        apps["conditional"].predict(*args, api_name="/generate")
    assert message in str(error.value)
    assert "Traceback" not in str(error.value)


def test_unconditional_refuses_a_class(apps):
    with pytest.raises(gradio_client.exceptions.AppError, match="this model is unconditional"):
        apps["unconditional"].predict("cat", 2, 1, 0, api_name="/generate")


def test_trajectory_app_plots_and_starts_at_the_start_state(apps):
    client = apps["trajectory"]
    plot = generate(client, NO_LABEL, 3, 1, 0)
    assert plot.shape[1] == 2 * 480 and plot.std() > 0  # one panel per channel, something drawn
    assert np.array_equal(plot, generate(client, NO_LABEL, 3, 1, 0))
    started = pixels(client.predict(NO_LABEL, 3, 1, 0, "0.5, 1", api_name="/generate"))
    assert not np.array_equal(plot, started)
    with pytest.raises(gradio_client.exceptions.AppError, match=r"the start state must be 2 numbers \(theta, omega\)"):
        client.predict(NO_LABEL, 3, 1, 0, "0.5, x", api_name="/generate")


def test_parse_start_state():
    assert parse_start_state("", ["a", "b"]) is None
    assert parse_start_state(" 0.5 , -1e-1 ", ["a", "b"]) == [0.5, -0.1]
    with pytest.raises(ValueError, match="2 finite numbers"):
        parse_start_state("1, 2, 3", ["a", "b"])
    with pytest.raises(ValueError, match="2 finite numbers"):
        parse_start_state("nan, 0", ["a", "b"])


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipelines").mkdir()
    for argv, message in [
        (["--pipeline", str(tmp_path / "missing")], "no such pipeline folder"),
        (["--pipeline", str(tmp_path)], "is not a pipeline folder (no model_index.json)"),
        (["--pipeline", "pipelines/mmf-mnst"], "no such pipeline folder: pipelines/mmf-mnst"),
        (["--pipeline", "user/name", "--server-port", "0"], "expected a port number between 1 and 65535"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_cli_refuses_a_port_in_use_before_loading(tmp_path, capsys, monkeypatch):
    import socket

    import mmf_diffusers.demo as demo_module

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded although the port is taken")

    monkeypatch.setattr(demo_module, "build_demo", no_load)
    folder = unconditional_folder(tmp_path / "pipe")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exit_:
            main(["--pipeline", folder, "--server-port", str(port)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mmf-demo: error: cannot serve on 127.0.0.1:{port}: ")
    assert "in use" in err[0]


def test_core_package_does_not_import_gradio():
    """No module of the package imports gradio when it is imported: gradio is imported inside functions only. (A
    subprocess that imports the package and looks at sys.modules says the same but costs 9 s of imports.)"""
    import ast
    import pathlib

    import mmf_diffusers

    def import_time_imports(node):
        """Import statements that run when the module is imported: everywhere but inside function bodies."""
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            elif not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from import_time_imports(child)

    files = sorted(pathlib.Path(mmf_diffusers.__file__).parent.glob("*.py"))
    assert any(f.name == "demo.py" for f in files)
    for path in files:
        for node in import_time_imports(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(n.split(".")[0] in ("gradio", "gradio_client") for n in names), (path.name, node.lineno)
    demo_source = (pathlib.Path(mmf_diffusers.__file__).parent / "demo.py").read_text()
    assert "import gradio as gr" in demo_source  # the check above looks at the right thing


def test_write_space(tmp_path):
    paths = write_space(str(tmp_path / "space"), "user/mmf-mnist", requirement="mmf_diffusers @ git+https://x/y")
    files = {p.rsplit("/", 1)[-1]: open(p).read() for p in paths}
    assert set(files) == {"app.py", "requirements.txt", "README.md"}
    assert 'build_demo("user/mmf-mnist")' in files["app.py"]
    compile(files["app.py"], "app.py", "exec")
    assert files["requirements.txt"] == "mmf_diffusers @ git+https://x/y\n"
    assert "sdk: gradio\n" in files["README.md"] and "- user/mmf-mnist\n" in files["README.md"]
    assert "mmf_diffusers[demo]==" in open(write_space(str(tmp_path / "s2"), "user/x")[1]).read()
    with pytest.raises(ValueError, match="user/name"):
        write_space(str(tmp_path / "s3"), "mmf-mnist")


def test_push_with_demo_writes_the_space_and_links_it_from_the_card(tmp_path, capsys, monkeypatch):
    from hub_server import HubServer

    from mmf_diffusers.hub import main as push_main

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    token = "hf_demo_test_token"
    folder = unconditional_folder(tmp_path / "tiny")
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    with pytest.raises(SystemExit) as exit_:
        push_main([folder, "tiny", "--token-file", str(token_file), "--with-demo"])
    assert exit_.value.code == 2 and "--with-demo needs REPO_ID as user/name" in capsys.readouterr().err
    with HubServer({token: "tester"}) as hub:
        assert push_main([folder, "tester/tiny", "--token-file", str(token_file), "--endpoint", hub.url,
                          "--with-demo"]) == 0
        card = hub.files("tester/tiny")["README.md"].decode()
        assert not hub.unknown_requests
    assert "## Demo" in card and "https://huggingface.co/spaces/tester/tiny-demo" in card
    assert "mmf-demo --pipeline tester/tiny" in card
    assert card.index("## Demo") < card.index("## How to load")
    space = tmp_path / "tiny-space"
    assert 'build_demo("tester/tiny")' in (space / "app.py").read_text()
    assert (space / "requirements.txt").read_text().startswith("mmf_diffusers[demo]==")
    out = capsys.readouterr().out
    assert f"hf upload tester/tiny-demo {space} --repo-type space" in out
    # Twice: one Demo section, not two.
    from mmf_diffusers.model_card import add_demo_section

    add_demo_section(tmp_path / "tiny" / "README.md", "tester/other-demo", "tester/tiny")
    text = (tmp_path / "tiny" / "README.md").read_text()
    assert text.count("## Demo") == 1 and "spaces/tester/other-demo" in text and "tiny-demo" not in text
