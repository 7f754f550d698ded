import json

import pytest

from megatron_offload.cli import main
from megatron_offload.schedule.validate import validate_schedule

KEYS = {"schedule", "pp", "vpp", "microbatches", "group_size", "makespan", "bubble_ratio",
        "peak_units", "offloaded_units_fraction", "slowdown_vs_no_offload"}
FLAGS = {"--pp", "--vpp", "--microbatches", "--schedule", "--group-size", "--offload-chunks",
         "--offload-ratio", "--forward-time", "--backward-time", "--json", "--out"}


def _json(capsys, *argv):
    assert main(["simulate", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_keys_and_values(capsys):
    report = _json(capsys, "--pp", "8", "--vpp", "2", "--microbatches", "16", "--schedule",
                   "interleaved", "--json")
    assert set(report) == KEYS
    assert report["peak_units"][0] == 23 and report["makespan"] == 117 and report["group_size"] == 8
    assert report["offloaded_units_fraction"] == 0 and report["slowdown_vs_no_offload"] == 0


def test_offload_flags(capsys):
    report = _json(capsys, "--pp", "8", "--vpp", "2", "--microbatches", "16", "--schedule", "gis",
                   "--group-size", "4", "--offload-chunks", "2", "--offload-ratio", "0.5", "--json")
    assert (
        report["peak_units"][0] == 2
        and report["makespan"] == 141
        and report["offloaded_units_fraction"] > 0.9
    )


def test_flags_are_pinned():
    from megatron_offload.cli import build_parser

    parser = build_parser("simulate")
    simulate = parser._subparsers._group_actions[0].choices["simulate"]
    flags = {option for action in simulate._actions for option in action.option_strings}
    assert FLAGS <= flags


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--pp", "0", "--microbatches", "4", "--schedule", "gis"], "--pp"),
        (["--pp", "4", "--microbatches", "8", "--schedule", "gis", "--group-size", "9"],
         "--group-size"),
        (["--pp", "4", "--vpp", "2", "--microbatches", "10", "--schedule", "interleaved"],
         "--microbatches"),
        (["--pp", "4", "--vpp", "2", "--microbatches", "8", "--schedule", "1f1b"], "--vpp"),
        (["--pp", "4", "--vpp", "2", "--microbatches", "8", "--schedule", "gis",
          "--offload-chunks", "3"], "--offload-chunks"),
        (["--pp", "4", "--microbatches", "8", "--schedule", "gis", "--forward-time", "0"],
         "--forward-time"),
        (["--pp", "4", "--microbatches", "8", "--schedule", "gis", "--offload-ratio", "-1"],
         "--offload-ratio"),
        (["--pp", "4", "--microbatches", "8", "--schedule", "gis", "--out", "x.jpg"], "--out"),
    ],
)
def test_bad_input_is_one_argparse_error_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["simulate", *argv])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "error:" in error and flag in error.split("error:")[1] and "Traceback" not in error


def test_ascii_and_pictures(tmp_path, capsys):
    svg, png = tmp_path / "t.svg", tmp_path / "t.png"
    assert main(["simulate", "--pp", "4", "--vpp", "2", "--microbatches", "8", "--schedule", "gis",
                 "--offload-ratio", "1", "--out", str(svg)]) == 0
    out = capsys.readouterr().out
    assert "rank 3" in out and "d2h" in out and svg.read_text().startswith("<?xml")
    assert main(["simulate", "--pp", "2", "--microbatches", "4", "--schedule", "1f1b", "--out",
                 str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_saved_schedule_loads_and_validates(tmp_path):
    from megatron_offload.schedule.ir import Schedule

    path = tmp_path / "s.txt"
    main(["simulate", "--pp", "4", "--vpp", "2", "--microbatches", "8", "--schedule", "gis",
          "--offload-ratio", "1", "--json", "--save-schedule", str(path)])
    schedule = validate_schedule(Schedule.load(path))
    assert schedule.has_offload
