"""Start-up refusals in process (a taken port) and the client CLI as users run it."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.client import VaeClient
from serving.client import cli as client_cli
from serving.server.app import StartupError, start_server
from tests.helpers import (
    ServerThread,
    mnist_5k_images,
    server_config,
)


def test_a_taken_port_stops_start_up(exported_repository: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=f"cannot listen for gRPC on 127.0.0.1:{port}"):
            asyncio.run(start_server(server_config(exported_repository, port=port)))


def test_cli_sample_writes_a_png_grid(
    vae_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "samples.png"
    argv = ["--target", vae_server.target, "sample", "-n", "64", "--seed", "1", "-o", str(output)]
    assert client_cli.main(argv) == 0
    assert capsys.readouterr().out == f"wrote {output}: 64 samples (rows 0..63 of seed 1) from version 1\n"
    with Image.open(output) as image:
        assert image.mode == "L" and image.size == (8 * 30 + 2, 8 * 30 + 2)  # 8 x 8 digits, 2-pixel gaps
        first = np.asarray(image)
    assert client_cli.main([*argv[:-1], str(tmp_path / "again.png")]) == 0
    with Image.open(tmp_path / "again.png") as again:
        np.testing.assert_array_equal(np.asarray(again), first)  # same seed, same picture


def test_cli_interpolate_writes_a_strip(
    vae_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in (("a.png", 0), ("b.png", 255)):
        Image.fromarray(np.full((56, 56), value, np.uint8)).save(tmp_path / name)  # resized to 28 x 28
    output = tmp_path / "strip.png"
    argv = ["--target", vae_server.target, "interpolate", str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert client_cli.main([*argv, "--steps", "10", "-o", str(output)]) == 0
    assert "10 images" in capsys.readouterr().out
    with Image.open(output) as image:
        assert image.size == (10 * 30 + 2, 32)


def test_cli_sample_offset_regenerates_one_cell_of_a_grid(
    vae_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--target", vae_server.target, "sample", "--seed", "4"]
    assert client_cli.main([*target, "-n", "4", "--columns", "4", "-o", str(tmp_path / "row.png")]) == 0
    assert client_cli.main([*target, "-n", "1", "--offset", "2", "-o", str(tmp_path / "third.png")]) == 0
    assert "rows 2..2 of seed 4" in capsys.readouterr().out
    with Image.open(tmp_path / "row.png") as row, Image.open(tmp_path / "third.png") as third:
        np.testing.assert_array_equal(np.asarray(row)[2:30, 62:90], np.asarray(third)[2:30, 2:30])


def digit_files(tmp_path: Path, count: int) -> list[Path]:
    paths = []
    for index, image in enumerate(mnist_5k_images(count).numpy()):
        paths.append(tmp_path / f"digit{index}.png")
        Image.fromarray(np.rint(image[0] * 255).astype(np.uint8)).save(paths[-1])
    return paths


def test_cli_score_prints_a_table_with_the_client_s_numbers(
    vae_server: ServerThread, vae_client: VaeClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = digit_files(tmp_path, 2)
    argv = ["--target", vae_server.target, "score", *map(str, paths), "--importance-samples", "4"]
    assert client_cli.main(argv) == 0
    header, *rows, footer = capsys.readouterr().out.splitlines()
    columns = ["negative_elbo", "reconstruction", "kl", "complexity", "corrected", "plugin_negative_elbo", "iwae"]
    assert header.split() == ["image", *columns]
    images = np.stack([np.asarray(Image.open(path))[None] for path in paths])
    expected = vae_client.score(images, importance_samples=4)
    for path, row, index in zip(paths, rows, range(len(paths)), strict=True):
        cells = row.split()
        assert cells[0] == str(path)
        for column, cell in zip(columns, cells[1:], strict=True):
            assert float(cell) == pytest.approx(getattr(expected, column)[index], abs=0.006), column
    assert "nats" in footer


def test_cli_reconstruct_and_traverse_write_grids(
    vae_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = digit_files(tmp_path, 3)
    target = ["--target", vae_server.target]
    assert client_cli.main([*target, "reconstruct", *map(str, paths), "-o", str(tmp_path / "r.png")]) == 0
    with Image.open(tmp_path / "r.png") as grid:
        assert grid.size == (2 * 30 + 2, 3 * 30 + 2)  # (image, reconstruction) per row
        np.testing.assert_array_equal(np.asarray(grid)[2:30, 2:30], np.asarray(Image.open(paths[0])))
    traverse = [*target, "traverse", str(paths[0]), "--dimensions", "0", "3", "--steps", "5", "-o"]
    assert client_cli.main([*traverse, str(tmp_path / "t.png")]) == 0
    assert "dimensions [0, 3] (one per row) over -3..3" in capsys.readouterr().out.splitlines()[-1]
    with Image.open(tmp_path / "t.png") as grid:
        assert grid.size == (5 * 30 + 2, 2 * 30 + 2)


def test_cli_info_prints_the_model_as_json(vae_server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert client_cli.main(["--target", vae_server.target, "info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["name"], info["version"], info["latent_dim"], info["health"]) == ("vae-mnist", 1, 20, "SERVING")


def test_cli_errors_are_one_line_without_traceback(
    vae_server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    assert client_cli.main(["--target", vae_server.target, "sample", "-n", "0"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {vae_server.target}: INVALID_ARGUMENT: num_samples must be at least 1, got 0\n"
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    assert client_cli.main(["--target", f"127.0.0.1:{port}", "--timeout", "5", "info"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: 127.0.0.1:{port}: UNAVAILABLE") and err.count("\n") == 1
    assert client_cli.main(["--target", vae_server.target, "interpolate", "missing.png", "b.png"]) == 1
    assert capsys.readouterr().err == "error: No such file or directory: missing.png\n"


def test_cli_output_into_a_closed_pipe_ends_quietly(vae_server: ServerThread) -> None:
    """`python -m serving.client ... info | head`: a reader that stops early is not an error, nor a traceback."""
    shell = f"{sys.executable} -m serving.client --target {vae_server.target} info | true"  # reads nothing
    result = subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
