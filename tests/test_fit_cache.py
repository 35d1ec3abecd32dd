"""A trained model is fit once per data, settings and code; the replay from the cache
gives the same numbers as the replay that fitted it."""

from offline_eval.report import ReplayConfig, run_replay
from recsys.datasets import load_dataset


def small():
    return load_dataset("synthetic", n_users=150, n_items=200, n_events=5_000, seed=3)


def test_a_second_replay_loads_the_fit_and_scores_the_same(tmp_path):
    cfg = ReplayConfig(models=("mf_online", "nested"), progress=False, fit_cache=tmp_path / "fits")
    first = run_replay(small(), cfg)
    second = run_replay(small(), cfg)
    for name in cfg.models:
        assert not first["models"][name]["fit_cached"]
        assert second["models"][name]["fit_cached"]
        assert second["models"][name]["fit_seconds"] == first["models"][name]["fit_seconds"]
        for part in ("overall", "cold", "warm", "slices"):
            assert second["models"][name][part] == first["models"][name][part], (name, part)
    assert len(list((tmp_path / "fits").iterdir())) == 2


def test_other_data_misses_the_cache(tmp_path):
    cfg = ReplayConfig(models=("mf_static",), progress=False, fit_cache=tmp_path / "fits")
    run_replay(small(), cfg)
    other = load_dataset("synthetic", n_users=150, n_items=200, n_events=5_000, seed=4)
    assert not run_replay(other, cfg)["models"]["mf_static"]["fit_cached"]
    assert len(list((tmp_path / "fits").iterdir())) == 2


def test_a_damaged_entry_is_fitted_again(tmp_path):
    cfg = ReplayConfig(models=("mf_static",), progress=False, fit_cache=tmp_path / "fits")
    first = run_replay(small(), cfg)
    (entry,) = (tmp_path / "fits").iterdir()
    (entry / "mf.safetensors").write_bytes(b"not a tensor file")
    again = run_replay(small(), cfg)
    assert not again["models"]["mf_static"]["fit_cached"]
    assert again["models"]["mf_static"]["overall"] == first["models"]["mf_static"]["overall"]
    assert run_replay(small(), cfg)["models"]["mf_static"]["fit_cached"]  # and replaced


def test_mf_online_reuses_the_fit_of_mf_static_and_scores_as_if_fitted_itself(tmp_path):
    shared = run_replay(small(), ReplayConfig(models=("mf_static", "mf_online"), progress=False,
                                              fit_cache=tmp_path / "fits"))
    assert not shared["models"]["mf_static"]["fit_cached"]
    assert shared["models"]["mf_online"]["fit_cached"]  # the same fit: only the replay differs
    assert len(list((tmp_path / "fits").iterdir())) == 1
    alone = run_replay(small(), ReplayConfig(models=("mf_online",), progress=False))
    assert shared["models"]["mf_online"]["overall"] == alone["models"]["mf_online"]["overall"]
