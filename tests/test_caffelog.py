"""Caffe's training log read for people: each test is reported once, at its own iteration, with the smoothed
training loss Caffe shows at that iteration (printed after the test), whatever test_interval and display are."""
import logging

from dsd_caffe import caffelog


def log_lines(max_iter, test_interval, display):
    """The lines `caffe train` prints, in its order: at a test iteration the test comes before the loss line."""
    lines = []
    for it in range(max_iter + 1):
        if it % test_interval == 0:
            lines.append(f"I1130 solver.cpp:330] Iteration {it}, Testing net (#0)")
            lines.append(f"I1130 solver.cpp:397]     Test net output #0: accuracy_top1 = {it / 1000:.4f}")
            lines.append(f"I1130 solver.cpp:397]     Test net output #1: loss = {2 - it / 1000:.4f} (* 1 = 2 loss)")
        if it % display == 0:
            lines.append(f"I1130 solver.cpp:218] Iteration {it} (3 iter/s, 1s/5 iters), loss = {1 + it / 100:.4f}")
            lines.append(f"I1130 sgd_solver.cpp:105] Iteration {it}, lr = 0.01")
    return lines


def finished(lines):
    parsed = caffelog.CaffeLog()
    out = [parsed.feed(line) for line in lines + [""]]
    return [d for d in out if d is not None], parsed


def test_each_test_once_at_its_iteration_with_its_loss():
    done, parsed = finished(log_lines(40, 10, 10))
    assert [(it, out["accuracy_top1"], loss) for it, out, loss in done] == [
        (0, 0.0, 1.0), (10, 0.01, 1.1), (20, 0.02, 1.2), (30, 0.03, 1.3), (40, 0.04, 1.4)]
    assert parsed.iteration == 40 and parsed.lr == 0.01


def test_test_interval_not_a_multiple_of_display():
    """Tests at 0, 15, 30: 15 has no loss line of its own (display 10); the next test follows at once."""
    done, _ = finished(log_lines(30, 15, 10))
    assert [(it, loss) for it, _, loss in done] == [(0, 1.0), (15, None), (30, 1.3)]
    done, _ = finished(log_lines(40, 15, 10)[:-2])  # a log cut after the last test block
    assert [it for it, _, _ in done] == [0, 15, 30]


def test_read_curve_and_progress_lines(tmp_path, caplog):
    path = tmp_path / "train.log"
    path.write_text("\n".join(log_lines(30, 15, 10)) + "\n")
    assert caffelog.read_curve(str(path)) == [(0, 0.0), (15, 0.015), (30, 0.03)]
    assert caffelog.read_curve(str(path), key="loss") == [(0, 2.0), (15, 1.985), (30, 1.97)]
    bar = caffelog.Progress("sparse", 30, 0)
    with caplog.at_level(logging.INFO, logger="dsd_caffe.caffelog"):
        for line in path.read_text().splitlines() + [""]:
            bar.feed(line)
    bar.close()
    assert [r.getMessage() for r in caplog.records] == [
        "sparse: iteration 0/30, training loss 1.0000; test: accuracy_top1 0.0000, loss 2.0000",
        "sparse: iteration 15/30; test: accuracy_top1 0.0150, loss 1.9850",
        "sparse: iteration 30/30, training loss 1.3000; test: accuracy_top1 0.0300, loss 1.9700"]


def test_failure_line_prefers_check_failed():
    parsed = caffelog.CaffeLog()
    for line in ["E1130 foo.cpp:1] Error reading something", "F1130 data_transformer.cpp:63] Check failed: "
                 "height <= datum_height (28 vs. 16)", "*** Check failure stack trace: ***"]:
        parsed.feed(line)
    assert parsed.failure[0] == "Check failed: height <= datum_height (28 vs. 16)"
