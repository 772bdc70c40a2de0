"""`python -m benchmarks` (benchmarks/__main__.py): its summary of the training-step and
sampling results, against hand-made inputs."""
import importlib.util
import os

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("benchmarks_main", os.path.join(HERE, "benchmarks", "__main__.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_summary_speeds_are_relative_to_pytorch():
    train = {"seconds_median": {"numba": 0.25, "torch": 0.5, "numpy": 1.0}}
    sample = {"images_per_second": {"numpy": 0.5, "numba": 2.0, "torch": 1.0}}
    rows = {r["implementation"]: r for r in bench.summarise(train, sample)}
    assert set(rows) == {"numba", "torch", "numpy"}
    assert rows["numba"]["step_speed_vs_torch"] == 2.0          # half PyTorch's time: 2x as fast
    assert rows["numpy"]["step_speed_vs_torch"] == 0.5
    assert rows["numba"]["sampling_speed_vs_torch"] == 2.0      # twice PyTorch's images per second
    assert rows["numpy"]["sampling_speed_vs_torch"] == 0.5
    assert rows["torch"]["step_speed_vs_torch"] == rows["torch"]["sampling_speed_vs_torch"] == 1.0


def test_summary_without_pytorch_or_a_figure_leaves_blanks():
    rows = {r["implementation"]: r for r in bench.summarise({"seconds_median": {"numba": 0.25, "numpy": 1.0}},
                                                            {"images_per_second": {"numpy": 0.5}})}
    assert rows["numba"]["images_per_second"] is None and rows["numba"]["step_speed_vs_torch"] is None
    assert rows["numpy"]["sampling_speed_vs_torch"] is None
    text = bench.table(list(rows.values()))
    assert text.splitlines()[1].split() == ["numba", "0.250", "-", "-", "-"]
