"""patches/ and scripts/apply_patch.sh: one diff per Megatron-LM release line adds
--pipeline-offload to pretrain_gpt.py.

Each diff is applied to a stand-in of that release's pretrain_gpt.py written here (the lines
the diff touches and its context, in the release's shape: 0.16/0.17 hand
``extra_args_provider`` to ``pretrain``, 0.18/0.19 to ``parse_and_validate_args``; not
Megatron-LM's code). With ``MEGATRON_LM_GIT`` pointing at a Megatron-LM clone (a bare mirror
is enough), the diffs are also applied to each release branch's real pretrain_gpt.py in a
temporary folder (nothing fetched is kept).
"""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APPLY = ROOT / "scripts" / "apply_patch.sh"
RELEASES = {16: "0.16.2", 17: "0.17.2", 18: "0.18.3", 19: "0.19.1"}

IMPORTS = {
    16: "from megatron.training.utils import (\n    is_first_or_last_pipeline_stage,\n)\n",
    18: "from megatron.training.training import update_seqlen_stats_from_cu_seqlens\n"
        "from megatron.training.utils import get_blend_and_blend_per_split, "
        "is_first_or_last_pipeline_stage\n",
}
IMPORTS[17], IMPORTS[19] = IMPORTS[16], IMPORTS[18]


def standin(minor: int) -> str:
    """A minimal pretrain_gpt.py in the shape of Megatron-LM core_r0.<minor>."""
    head = (
        "import time\n\nfrom megatron.training import pretrain\n" + IMPORTS[minor]
        + "from model_provider import model_provider\n\n"
        "try:\n    from megatron.post_training.arguments import add_modelopt_args\n"
        "    has_nvidia_modelopt = True\nexcept ImportError:\n    has_nvidia_modelopt = False\n\n\n"
        "def forward_step(data_iterator, model):\n    raise NotImplementedError\n\n\n"
        'if __name__ == "__main__":\n'
        "    # Timestamp right after entering __main__ block (after all imports/library setup)\n"
        "    _MAIN_ENTRY_TIME = time.time()\n\n"
    )
    if minor <= 17:  # pretrain parses the flags itself
        return head + (
            "    pretrain(\n        None,\n        model_provider,\n"
            "        ModelType.encoder_or_decoder,\n        forward_step,\n"
            "        args_defaults={'tokenizer_type': 'GPT2BPETokenizer'},\n"
            "        extra_args_provider=add_modelopt_args if has_nvidia_modelopt else None,\n"
            "        store=store,\n        get_embedding_ranks=get_embedding_ranks,\n    )\n"
        )
    after = ("    full_config = pretrain_cfg_container_from_args(args)\n" if minor == 18
             else "    if has_nvidia_modelopt:\n        maybe_enable_modelopt(args)\n")
    return head + (
        "    pretrain, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)\n\n"
        "    args = parse_and_validate_args(\n"
        "        extra_args_provider=add_modelopt_args if has_nvidia_modelopt else None,\n"
        "        args_defaults={'tokenizer_type': 'GPT2BPETokenizer'},\n    )\n" + after
    )


def checkout(tmp_path: Path, minor: int, source: str, release: str | None = None) -> Path:
    major_minor_patch = (release or RELEASES[minor]).split(".")
    folder = tmp_path / f"Megatron-LM-{minor}"
    (folder / "megatron" / "core").mkdir(parents=True)
    (folder / "megatron" / "core" / "package_info.py").write_text(
        "MAJOR = {}\nMINOR = {}\nPATCH = {}\n".format(*major_minor_patch))
    (folder / "pretrain_gpt.py").write_text(source)
    return folder


def apply(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(APPLY), str(folder), *extra], capture_output=True, text=True)


def test_one_patch_per_supported_release():
    assert sorted(p.name for p in (ROOT / "patches").glob("*.patch")) == [
        f"megatron-lm-core_r0.{m}.patch" for m in (16, 17, 18, 19)]


@pytest.mark.parametrize("minor", [16, 17, 18, 19])
def test_patch_applies_to_a_standin_of_each_release(tmp_path, minor):
    folder = checkout(tmp_path, minor, standin(minor))
    assert apply(folder, "--check").returncode == 0
    assert "megatron_offload" not in (folder / "pretrain_gpt.py").read_text()  # --check only
    done = apply(folder)
    assert done.returncode == 0, done.stderr
    patched = (folder / "pretrain_gpt.py").read_text()
    ast.parse(patched)
    assert "from megatron_offload.integration import megatron_lm as pipeline_offload" in patched
    assert "    pipeline_offload.setup()\n" in patched
    assert "extra_args_provider=pipeline_offload.with_offload_arguments(" in patched
    # setup() runs first in __main__, before Megatron parses anything
    main = patched.index('if __name__ == "__main__":')
    assert patched.index("pipeline_offload.setup()") < patched.index("_MAIN_ENTRY_TIME", main)
    again = apply(folder)
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_unsupported_release_and_edited_file_are_refused(tmp_path):
    old = apply(checkout(tmp_path, 16, standin(16), release="0.15.3"))
    assert old.returncode == 2 and "Megatron-LM 0.15.3 has no patch here" in old.stderr
    assert "(releases: 0.16, 0.17, 0.18, 0.19)" in old.stderr
    edited = checkout(tmp_path, 18, standin(18).replace("parse_and_validate_args(", "parse("))
    result = apply(edited)
    assert result.returncode == 2 and "does not apply" in result.stderr
    assert "megatron_offload" not in (edited / "pretrain_gpt.py").read_text()
    assert apply(tmp_path / "nowhere").returncode == 2


# The real release branches (a Megatron-LM clone, not reachable from CI) are checked by
# scripts/check_releases.sh with MEGATRON_LM_GIT set: it applies each patch to the release's
# own pretrain_gpt.py and runs it through the launcher.
