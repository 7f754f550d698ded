"""``megatron-offload plan``: Megatron-LM's flags, pinned; unknown flags listed; output."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_offload import cli

PLAN_FLAGS = {
    # Megatron-LM's own flags
    "--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
    "--num-query-groups", "--group-query-attention", "--kv-channels", "--seq-length",
    "--max-position-embeddings", "--vocab-size", "--make-vocab-size-divisible-by", "--swiglu",
    "--normalization", "--disable-bias-linear", "--position-embedding-type",
    "--use-rotary-position-embeddings", "--untie-embeddings-and-output-weights", "--hidden-dropout",
    "--attention-dropout", "--attention-softmax-in-fp32", "--bf16", "--fp16", "--transformer-impl",
    "--attention-backend", "--use-flash-attn", "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion",
    "--no-rope-fusion", "--no-masked-softmax-fusion", "--micro-batch-size", "--global-batch-size",
    "--tensor-model-parallel-size", "--pipeline-model-parallel-size",
    "--num-layers-per-virtual-pipeline-stage", "--num-virtual-stages-per-pipeline-rank",
    "--microbatch-group-size-per-virtual-pipeline-stage", "--sequence-parallel",
    "--context-parallel-size", "--recompute-granularity", "--recompute-method",
    "--recompute-num-layers", "--recompute-modules", "--recompute-activations",
    "--distribute-saved-activations", "--use-distributed-optimizer",
    "--accumulate-allreduce-grads-in-fp32", "--optimizer",
    # the planner's
    "--gpu", "--gpu-memory-gib", "--gpu-tflops", "--host-link-gbps", "--host-memory-gib",
    "--gpus-per-node", "--memory-budget-gib", "--offload-memory-budget-gib", "--memory-reserve-gib",
    "--host-memory-fraction", "--world-size", "--data-parallel-size", "--padded-vocab-size",
    "--offload-schedule", "--no-recompute-fallback", "--offload-min-bytes", "--json", "--out",
    "--offload-memory-budget-scope", "--offload-memory-reserve-gib", "--offload-prefetch",
    "--offload-policy",
}
JSON_KEYS = {"k", "schedule", "group_size", "offload_chunks", "predicted_peak_activation_gib",
             "predicted_peak_memory_gib", "predicted_slowdown", "host_memory_gib_per_node", "fits"}

SMALL = ["--num-layers", "16", "--hidden-size", "2048", "--num-attention-heads", "16",
         "--seq-length", "4096", "--bf16", "--hidden-dropout", "0", "--attention-dropout", "0",
         "--vocab-size", "32000", "--micro-batch-size", "1", "--global-batch-size", "16",
         "--pipeline-model-parallel-size", "4", "--num-layers-per-virtual-pipeline-stage", "2"]
HW = ["--gpu-memory-gib", "80", "--gpu-tflops", "200", "--host-link-gbps", "30",
      "--host-memory-gib", "1024"]


def _flags(command: str) -> set[str]:
    parser = cli.build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {opt for action in sub._actions for opt in action.option_strings} - {"-h", "--help"}


def test_plan_flags_are_pinned():
    assert _flags("plan") == PLAN_FLAGS


def _run(capsys, *argv) -> tuple[int, str]:
    code = cli.main(["plan", *argv])
    return code, capsys.readouterr().out


def test_json_has_the_contract_keys(capsys):
    code, out = _run(capsys, *SMALL, *HW, "--json")
    report = json.loads(out)
    assert code == 0 and JSON_KEYS <= set(report)
    assert (report["fits"] is True and report["offload_chunks"] == 0
            and report["schedule"] == "interleaved")
    assert len(report["predicted_peak_memory_gib"]) == 4 and report["predicted_slowdown"] == 0
    assert report["ignored_flags"] == [] and report["microbatches"] == 16 and report["vpp"] == 2


def test_unknown_megatron_flags_are_listed_not_rejected(capsys):
    pasted = ["--lr", "3e-4", "--use-mcore-models",
              "--data-path", "1.0", "/data/a", "0.5", "/data/b",
              "--tokenizer-type", "GPT2BPETokenizer", "--clip-grad", "-1", "--overlap-grad-reduce"]
    code, out = _run(capsys, *pasted[:4], *SMALL, *pasted[4:], *HW, "--json")
    report = json.loads(out)
    assert code == 0
    assert report["ignored_flags"] == ["--lr 3e-4", "--use-mcore-models",
                                       "--data-path 1.0 /data/a 0.5 /data/b",
                                       "--tokenizer-type GPT2BPETokenizer", "--clip-grad -1",
                                       "--overlap-grad-reduce"]
    # no prefix matching: --seq is not --seq-length
    code, text = _run(capsys, *SMALL, "--seq", "5", *HW)
    assert code == 0 and "ignored by the planner: --seq 5" in text


def test_text_report_has_a_row_per_rank_and_the_choice(capsys):
    code, text = _run(capsys, *SMALL, *HW, "--memory-budget-gib", "8",
                      "--offload-schedule", "megatron")
    assert code == 0
    lines = text.splitlines()
    rows = [ln for ln in lines if ln.strip()[:1].isdigit() and "|" in ln]
    assert len(rows) == 4
    assert any(ln.startswith("PLAN: interleaved g=4") and "--offload-policy" in ln for ln in lines)
    assert ("predicted iteration time" in text and "slowdown" in text and "why:" in text
            and "k = " in text)


def test_does_not_fit_exits_1_with_the_missing_gib(capsys):
    code, text = _run(capsys, *SMALL, *HW, "--memory-budget-gib", "2")
    assert code == 1
    assert "DOES NOT FIT:" in text and "GiB missing on the worst rank" in text


def test_out_draws_the_planned_schedule(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    svg = tmp_path / "plan.svg"
    code, text = _run(capsys, *SMALL, *HW, "--memory-budget-gib", "8", "--out", str(svg))
    assert code == 0 and svg.read_text().startswith("<?xml") and f"wrote {svg}" in text


def test_megatron_flag_semantics(capsys):
    base = ["--num-layers", "8", "--hidden-size", "1024", "--num-attention-heads", "16",
            "--seq-length", "1024", *HW, "--json"]
    report = json.loads(_run(capsys, *base, "--num-query-groups", "4")[1])
    # Megatron-LM ignores groups without it
    assert any("--group-query-attention" in w for w in report["warnings"])
    report = json.loads(_run(capsys, *base, "--pipeline-model-parallel-size", "2",
                             "--num-virtual-stages-per-pipeline-rank", "2",
                             "--global-batch-size", "32", "--world-size", "8")[1])
    assert (report["vpp"], report["dp"], report["microbatches"]) == (2, 4, 8)
    report = json.loads(_run(capsys, *base, "--recompute-activations")[1])
    assert report["recompute"] == "selective(core_attn)"


@pytest.mark.parametrize("argv, flag", [
    (["--hidden-size", "1024", "--num-attention-heads", "16", "--seq-length", "64", *HW],
     "--num-layers"),
    (["--num-layers", "6", "--hidden-size", "1024", "--num-attention-heads", "16",
      "--seq-length", "64", "--pipeline-model-parallel-size", "4", *HW], "--num-layers"),
    ([*SMALL, "--gpu-memory-gib", "80"], "--gpu-tflops"),
    ([*SMALL, "--gpu", "h100-80g", "--out", "x.jpg"], "--out"),
    ([*SMALL, "--gpu", "h100-80g", "--world-size", "6"], "--world-size"),
    ([*SMALL, "--gpu", "h100-80g", "--memory-reserve-gib", "200"], "--memory-reserve-gib"),
])
def test_bad_input_is_one_argparse_error_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plan", *argv])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "error:" in error and flag in error.split("error:")[1] and "Traceback" not in error


def test_planner_modules_never_import_torch():
    code = (
        "import sys\n"
        "import megatron_offload.planning.costmodel, megatron_offload.planning.hardware, "
        "megatron_offload.planning.job\n"
        "from megatron_offload.planning import auto, candidates, granularity, plan, reasons, "
        "remedies, search, unit_search\n"
        "import megatron_offload.cli.plan\n"
        "from megatron_offload.schedule import memory\n"
        "from megatron_offload.cli import main\n"
        "main(['plan', '--num-layers', '8', '--hidden-size', '512', '--num-attention-heads', '8',"
        " '--seq-length', '256', '--gpu', 'h100-80g', '--json'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
