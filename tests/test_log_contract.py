"""The input contract (docs/data.md): a user's own log is read as written, its timestamp unit
told or refused, its bad rows dropped and counted — never a silent guess."""

import gzip

import polars as pl
import pytest

from commands.cli import main
from offline_eval.report import ReplayConfig, run_replay
from recsys.datasets import load_dataset, load_log
from recsys.log_contract import ReadConfig, parse_columns, read_log

HEADER = "user_id,item_id,timestamp\n"


def write(tmp_path, text: str, name: str = "log.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_string_ids_are_kept_exactly_as_written(tmp_path):
    path = write(tmp_path, HEADER + "cust-45,sku-123,1406073600\n007,1193,1406073601\n")
    frame, _ = read_log(path)
    assert frame["user_id"].to_list() == ["cust-45", "007"]
    assert frame["item_id"].to_list() == ["sku-123", "1193"]  # never 1193.0, never a code


@pytest.mark.parametrize("stamps,unit", [
    (["1406073600000", "1406073601500"], "ms"),
    (["1406073600000000", "1406073601500000"], "us"),
    (["2014-07-23T00:00:00Z", "2014-07-23 01:00:01.5+01:00"], "iso"),
    (["2014-07-23", "2014-07-23"], "iso"),
])
def test_timestamp_units_are_detected_and_read_as_seconds(tmp_path, stamps, unit):
    path = write(tmp_path, HEADER + "".join(f"u{i},i{i},{t}\n" for i, t in enumerate(stamps)))
    frame, notes = read_log(path)
    assert notes.ts_unit == unit and notes.ts_unit_detected
    assert frame["ts"][0] == 1406073600
    assert frame["ts"][1] in (1406073600, 1406073601)
    assert f"ts in {unit} (detected)" in notes.summary()


def test_a_unit_that_cannot_be_told_apart_is_refused_with_the_flag_to_set(tmp_path):
    rows = [f"u{i},i{i},{t}\n" for i, t in enumerate([1406073600] * 500 + [1406073600000] * 500)]
    path = write(tmp_path, HEADER + "".join(rows))
    with pytest.raises(ValueError, match=r"mixes units \(s and ms\).*--ts-unit"):
        read_log(path)
    frame, notes = read_log(path, ReadConfig(ts_unit="ms"))
    assert notes.ts_unit == "ms" and not notes.ts_unit_detected  # the user's word, and the report says so
    assert frame["ts"][-1] == 1406073600 and "ts in ms (as set)" in notes.summary()


def test_ts_and_timestamp_are_synonyms_and_columns_map_anything_else(tmp_path):
    a = write(tmp_path, "user_id,item_id,ts\nu,i,100\n", "a.csv")
    b = write(tmp_path, "user_id,item_id,timestamp\nu,i,100\n", "b.csv")
    assert read_log(a)[0].equals(read_log(b)[0])
    c = write(tmp_path, "who,what,when,sku\nu,i,100,x\n", "c.csv")
    mapping = parse_columns("user=who,item=what,ts=when")
    assert mapping == {"user_id": "who", "item_id": "what", "ts": "when"}
    frame, notes = read_log(c, ReadConfig(columns=mapping))
    assert frame.select("user_id", "item_id", "ts").row(0) == ("u", "i", 100)
    assert notes.columns == mapping


def test_a_missing_column_names_what_was_looked_for_and_the_flag_that_maps_it(tmp_path):
    path = tmp_path / "log.parquet"
    pl.DataFrame({"u": [1], "i": [2], "ts": [3]}).write_parquet(path)
    with pytest.raises(ValueError, match=r"no column for user_id, item_id .*--columns user=COLUMN,item=COLUMN"):
        load_log(path)
    with pytest.raises(ValueError, match="--columns maps user_id to 'nope'"):
        read_log(path, ReadConfig(columns={"user_id": "nope"}))


def test_bad_rows_are_dropped_and_counted_with_the_first_line(tmp_path):
    text = HEADER + "a,x,100\n,x,101\nb,,102\nc,x,\nd,x,not-a-time\ne,x,103,extra\nf,x,104\n"
    frame, notes = read_log(write(tmp_path, text), ReadConfig(max_bad_fraction=0.9))
    assert frame["user_id"].to_list() == ["a", "f"]
    assert notes.dropped == {"empty user_id": 1, "empty item_id": 1, "empty ts": 1, "unparsable ts": 1, "ragged": 1}
    assert notes.first_bad_line == 3  # the header is line 1
    assert "dropped 5 of 7 rows" in notes.summary() and "first at line 3" in notes.summary()


def test_too_many_bad_rows_reject_the_file_with_the_line_and_the_reason(tmp_path):
    text = HEADER + "a,x,100\nb,x,\nc,x,102\n"
    with pytest.raises(ValueError, match=r"1 of 3 rows are bad.*line 3: empty ts"):
        read_log(write(tmp_path, text))


def test_the_replay_of_a_file_with_bad_rows_equals_the_replay_of_its_clean_rows(tmp_path):
    log = load_dataset("synthetic", n_users=120, n_items=150, n_events=3_000, seed=2).interactions
    clean = log.with_columns(pl.col("user_id").cast(str).map_elements(lambda u: f"cust-{u}", return_dtype=pl.Utf8),
                             pl.col("item_id").cast(str).map_elements(lambda i: f"sku-{i}", return_dtype=pl.Utf8))
    lines = [f"{u},{i},{t * 1000}" for u, i, t in clean.select("user_id", "item_id", "ts").iter_rows()]
    bad = list(lines)
    for at, row in ((50, "cust-1,,1000"), (900, ",sku-3,1000"), (1700, "cust-2,sku-2,"), (2500, "x,y,1,2")):
        bad.insert(at, row)
    write(tmp_path, HEADER + "\n".join(lines) + "\n", "clean.csv")
    with gzip.open(tmp_path / "dirty.csv.gz", "wt") as f:
        f.write(HEADER + "\n".join(bad) + "\n")
    dirty = load_log(tmp_path / "dirty.csv.gz")
    assert sum(dirty.extra["read"].dropped.values()) == 4 and dirty.extra["read"].ts_unit == "ms"
    cfg = ReplayConfig(models=("pop_online_decay", "itemknn_online"), progress=False)
    a, b = run_replay(load_log(tmp_path / "clean.csv"), cfg), run_replay(dirty, cfg)
    for name in cfg.models:
        assert a["models"][name]["overall"] == b["models"][name]["overall"]
    assert b["dataset"]["read"]["dropped"] == dict(dirty.extra["read"].dropped)


def test_a_cli_error_is_one_line_not_a_traceback(tmp_path, capsys):
    path = write(tmp_path, "customer,sku\na,b\n")
    assert main(["replay", "--data", str(path), "--models", "pop_static", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column for ts" in err[0] and "Traceback" not in err[0]


def test_item_columns_become_item_attributes(tmp_path):
    text = "user_id,item_id,timestamp,event_type,price\na,sku-1,100,view,9.99\nb,sku-1,101,purchase,8.5\n" \
           "a,sku-2,102,VIEW,\n"
    ds = load_log(write(tmp_path, text), ReadConfig(item_columns=("price",)))
    assert ds.interactions.columns == ["user_id", "item_id", "ts", "event_type"]
    assert ds.interactions["event_type"].to_list() == ["view", "purchase", "view"]
    assert dict(ds.items.select("item_id", "price").iter_rows()) == {"sku-1": 8.5, "sku-2": None}
