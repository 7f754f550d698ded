import pytest

from megatron_offload.schedule.catalog import make_schedule
from megatron_offload.schedule.ir import B, F, O, Op, R, Schedule, ScheduleError, diff_schedules
from megatron_offload.schedule.kinds import OpKind
from megatron_offload.schedule.validate import validate_schedule


def test_op_text_form_unchanged():
    assert str(F(0, 3)) == "0F3" and Op.parse("1B12") == B(1, 12)
    assert Op.parse(" 2O5 ") == O(2, 5) and str(R(0, 1)) == "0R1"
    assert [k.value for k in OpKind] == ["F", "B", "O", "R"]


@pytest.mark.parametrize("kind,pp,vpp,m,g",
                         [("1f1b", 4, 1, 8, None), ("interleaved", 4, 2, 8, 4),
                          ("gis", 4, 3, 9, 2)])
def test_text_round_trip(kind, pp, vpp, m, g, tmp_path):
    schedule = make_schedule(kind, pp, vpp, m, g)
    assert Schedule.from_text(schedule.to_text()) == schedule
    path = tmp_path / "s.csv"
    schedule.save(path)
    assert Schedule.load(path) == schedule
    assert diff_schedules(schedule, Schedule.load(path)) == ""


def test_text_is_one_csv_row_per_rank():
    text = make_schedule("1f1b", 2, 1, 2).to_text().splitlines()
    assert text[1:] == ["0F0,0F1,0B0,0B1", "0F0,0B0,0F1,0B1"]


def test_diff_names_rank_and_step():
    a = make_schedule("gis", 4, 2, 8, 4)
    b = make_schedule("interleaved", 4, 2, 8, 4)
    report = diff_schedules(a, b)
    assert "rank 0: first difference at step 8" in report


def test_validation_rejects_backward_before_forward_with_grid():
    bad = Schedule([[B(0, 0), F(0, 0)]], 1, 1)
    with pytest.raises(ScheduleError) as error:
        validate_schedule(bad)
    assert "[0B0]" in str(error.value) and "rank 0" in str(error.value)


def test_validation_rejects_missing_unit():
    with pytest.raises(ScheduleError, match="never gets its forward"):
        validate_schedule(Schedule([[F(0, 0), B(0, 0)]], 1, 2))


def test_validation_rejects_reload_without_offload():
    with pytest.raises(ScheduleError, match="reload"):
        validate_schedule(Schedule([[F(0, 0), R(0, 0), B(0, 0)]], 1, 1))


def test_validation_detects_deadlock_and_marks_waiting_steps():
    bad = Schedule([[F(0, 0), B(0, 0), F(0, 1), B(0, 1)],
                    [F(0, 0), F(0, 1), B(0, 0), B(0, 1)]], 1, 2)
    with pytest.raises(ScheduleError, match="deadlock") as error:
        validate_schedule(bad)
    grid = str(error.value)
    assert "[0B0]" in grid and "[0F1]" in grid


def test_validation_detects_p2p_order_mismatch():
    bad = Schedule([[F(0, 1), F(0, 0), B(0, 0), B(0, 1)],
                    [F(0, 0), B(0, 0), F(0, 1), B(0, 1)]], 1, 2)
    with pytest.raises(ScheduleError, match="p2p order mismatch on rank 0 -> rank 1"):
        validate_schedule(bad)


def test_long_schedule_grid_is_windowed():
    schedule = make_schedule("1f1b", 2, 1, 40)
    ranks = [list(r) for r in schedule.ranks]
    ranks[1][50], ranks[1][51] = ranks[1][51], ranks[1][50]
    with pytest.raises(ScheduleError) as error:
        validate_schedule(Schedule(ranks, 1, 40))
    assert "(steps" in str(error.value)
