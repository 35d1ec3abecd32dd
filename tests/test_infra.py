"""Deployment files, checked here where no Docker engine or cluster runs: the compose file
against the Compose Specification schema, the Kubernetes manifests against the API
schemas (strict: unknown fields fail), and every `recsys` command in them against the CLI."""

from __future__ import annotations

import json
import shlex
from importlib.resources import files
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from commands.cli import build_parser

INFRA = Path(__file__).resolve().parents[1] / "infra"
K8S_VERSION = "1.33.0"  # the oldest Kubernetes these manifests promise to work on
MANIFESTS = sorted(p for p in (INFRA / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")


def recsys_commands(command) -> list[list[str]]:
    """The `recsys` invocations in a container command: an argument list for the image's
    `recsys` entry point, or one shell string chaining several with `&&`."""
    if isinstance(command, list) and not (len(command) == 1 and " " in command[0]):
        return [list(command)]
    text = command if isinstance(command, str) else command[0]
    calls = [shlex.split(part) for part in text.split("&&")]
    return [call[1:] for call in calls if call and call[0] == "recsys"]


def test_compose_file_follows_the_compose_spec():
    schema = json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    jsonschema.validators.validator_for(schema)(schema).validate(compose)
    assert {"kafka", "redis", "worker", "server"} <= set(compose["services"])
    kafka = compose["services"]["kafka"]["environment"]
    assert "controller" in kafka["KAFKA_PROCESS_ROLES"]  # KRaft: no ZooKeeper service
    assert "zookeeper" not in compose["services"]


def test_compose_publishes_only_on_loopback_and_redis_keeps_its_rows():
    services = yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]
    published = [(name, port) for name, svc in services.items() for port in svc.get("ports", [])]
    assert published and all(port.startswith("127.0.0.1:") for _, port in published), published
    redis = services["redis"]
    assert "ports" not in redis and "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifest_is_valid(manifest):
    for doc in yaml.safe_load_all(manifest.read_text()):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((INFRA / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    return spec.get("template", {}).get("spec", {}).get("containers", [])


def test_every_recsys_command_in_the_deployment_files_parses():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    commands = [c for svc in compose["services"].values() if "command" in svc and svc.get("image", "").startswith("recsys")
                for c in recsys_commands(svc["command"])]
    for manifest in MANIFESTS:
        for doc in yaml.safe_load_all(manifest.read_text()):
            for container in _containers(doc):
                commands += recsys_commands(container.get("args", []))
    subcommands = [c[0] for c in commands]
    assert {"train", "export", "features", "stream", "serve"} <= set(subcommands), subcommands
    parser = build_parser()
    for args in commands:
        parser.parse_args(args)  # exits (fails the test) on an unknown flag or subcommand


def test_worker_replicas_do_not_exceed_the_partitions():
    config = yaml.safe_load((INFRA / "k8s" / "configmap.yaml").read_text())["data"]
    worker = yaml.safe_load((INFRA / "k8s" / "worker-deployment.yaml").read_text())
    assert worker["spec"]["replicas"] <= int(config["PARTITIONS"])
    used = {v[2:-1] for c in _containers(worker) for v in c["args"] if v.startswith("$(")}
    declared = set(config) | {e["name"] for c in _containers(worker) for e in c.get("env", [])}
    assert used <= declared, used - declared  # every $(VAR) in the args is defined


def test_no_secret_ships_with_the_deployment_and_none_goes_on_a_command_line():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    key = compose["services"]["server"]["environment"]["RECSYS_API_KEY"]
    assert key.startswith("${RECSYS_API_KEY:?"), "compose must refuse to start without a key, not default one"
    assert "RECSYS_API_KEY=\n" in (INFRA / ".env.example").read_text()  # a blank to fill, not a value
    with pytest.raises(SystemExit):  # a key as a flag would be visible to every user of the host (ps)
        build_parser().parse_args(["serve", "--api-key", "s3cret"])
    worker = build_parser().parse_args(["stream"])
    assert worker.metrics_host == "127.0.0.1"  # metrics stay on loopback unless told otherwise
