"""`celldit bench image`: the importable function and the CLI, on CPU with tiny settings."""

from __future__ import annotations

import json

import pytest

import celldit.cli as cli
from celldit.bench import bench_image, peak_tflops_for
from celldit.models.flops import preset_forward_macs

TINY = dict(preset="DiT-S/8", image_size=64, batch_size=2, steps=2, warmup=1, device="cpu", threads=1)


def test_bench_image_cpu_returns_json_dict():
    res = bench_image(**TINY, peak_tflops=1.0, reference=True)
    assert json.loads(json.dumps(res)) == res  # JSON-serialisable, no NaN/objects
    macs = preset_forward_macs("DiT-S/8", image_size=64)
    assert res["model"]["forward_macs_per_image"] == macs.total
    assert res["model"]["training_flops_per_image"] == 6 * macs.total
    assert res["config"]["latent_shape"] == [4, 8, 8] and res["config"]["precision"] == "fp32"
    for phase in ("train", "sample"):
        assert res[phase]["images_per_s"] > 0
        assert res[phase]["peak_memory_bytes"] > 0
        assert res[phase]["mfu"] == pytest.approx(res[phase]["achieved_tflops"] / 1.0)
    assert res["train"]["achieved_tflops"] == pytest.approx(
        res["train"]["images_per_s"] * 6 * macs.total / 1e12
    )
    assert res["sample"]["finite"] is True
    assert res["reference"]["images_per_s"] > 0 and res["reference"]["speedup"] > 0
    assert res["peak_tflops_source"].startswith("given")
    assert res["machine"]["cpu_count"] >= 1 and res["machine"]["torch"]


def test_bench_rejects_bad_settings():
    with pytest.raises(ValueError, match="DiT-M/2"):
        bench_image(**{**TINY, "preset": "DiT-M/2"})
    with pytest.raises(ValueError, match="precision"):
        bench_image(**TINY, precision="fp16")
    with pytest.raises(ValueError, match="steps"):
        bench_image(**{**TINY, "steps": 0})
    with pytest.raises(ValueError, match="multiple of 8"):
        bench_image(**{**TINY, "image_size": 60})


def test_peak_table():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3", "bf16")[0] == 989.4
    assert peak_tflops_for("NVIDIA H200", "bf16")[0] == 989.4
    assert peak_tflops_for("NVIDIA H100 PCIe", "bf16")[0] == 756.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB", "bf16")[0] == 312.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB", "fp32", tf32=True)[0] == 156.0
    assert peak_tflops_for("AMD EPYC 7B13", "fp32") == (None, None)


def test_cli_prints_one_json_object(capsys):
    argv = ["bench", "image", "--preset", "DiT-S/8", "--image-size", "64", "--batch-size", "2",
            "--steps", "1", "--warmup", "0", "--device", "cpu", "--threads", "1", "--peak-tflops", "2"]
    assert cli.main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["benchmark"] == "image" and res["config"]["preset"] == "DiT-S/8"
    assert res["train"]["images_per_s"] > 0 and res["sample"]["images_per_s"] > 0
    assert res["model"]["forward_macs_per_image"] == preset_forward_macs("DiT-S/8", 64).total
    assert res["peak_tflops"] == 2.0


def test_cli_user_error_is_reported_not_raised(capsys):
    assert cli.main(["bench", "image", "--preset", "DiT-S/8", "--image-size", "60", "--device", "cpu"]) == 2
    assert "image_size=60" in capsys.readouterr().err
    assert cli.main(["bench", "image", "--preset", "DiT-M/2"]) == 2  # argparse choices
    assert "invalid choice: 'DiT-M/2'" in capsys.readouterr().err


def test_gpu_check_smoke_runs_on_cpu_and_reports_every_figure(tmp_path):
    """The GPU check is prepared for a GPU machine; --smoke runs it at tiny sizes on the CPU
    so that it cannot rot: every section is present and every rate is positive."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--smoke", "--work", str(tmp_path), "--out", str(tmp_path / "gpu.json")]) == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["config"]["smoke"] and result["image"]["train"]["images_per_s"] > 0
    assert result["image"]["reference"]["images_per_s"] > 0  # the fp32 eager step, measured in the same run
    assert {"module", "latent", "gene"} == set(result["cells"])
    assert all(v["cells_per_s"] > 0 for v in result["cells"].values())
    assert result["counterfactual"]["cells"] == 2000 and result["counterfactual"]["seconds"] > 0
    # the official fixture on this device: exact in fp32 on the CPU, bf16 off by its rounding only
    assert result["parity"]["fp32_max_abs_diff"] < 1e-5
    assert 0 < result["parity"]["bf16_relative_error"] < 2e-2
