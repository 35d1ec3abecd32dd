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


def test_editing_any_file_of_the_model_or_the_replay_invalidates_every_fit(tmp_path):
    import shutil

    from offline_eval.fit_cache import CODE_FOLDERS, ROOT, code_digest

    for folder in CODE_FOLDERS:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_digest(tmp_path)
    assert code_digest(tmp_path) == before  # the same code, the same key
    nested = tmp_path / "offline_eval" / "nested.py"  # where NestedReplay.fit lives
    nested.write_text(nested.read_text() + "\n# an edit\n")
    edited = code_digest(tmp_path)
    assert edited != before
    (tmp_path / "recsys" / "new_level.py").write_text("X = 1\n")  # a module nobody listed
    assert code_digest(tmp_path) != edited
