"""deploy/kubernetes/ checked without a cluster: every manifest parses; every tinyps command
line in it, shell variables filled in as Kubernetes would, parses with tinyps's own parser;
and the pieces agree: the cluster spec with the StatefulSet, the headless Service, the Job,
the mounted files and the probes; the Secret's keys with what refers to them; the token
stays out of the ConfigMap and off every command line. The health probe the servers run
(TLS-capable, unlike Kubernetes' built-in grpc probe) is run against a live TLS server."""

import json
import re
import runpy
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from certs import issue, make_ca

from ps.server import serve
from tinyps.cli import build_parser
from tinyps.spec import ClusterSpec

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
MANIFESTS = ("secret.yaml", "configmap.yaml", "servers.yaml", "workers.yaml")

# Sample values for the shell expressions in the manifests, as Kubernetes would give them:
# the server pod tinyps-server-1, the worker of index 1, some date.
SAMPLES = [
    (r"\$\{HOSTNAME##\*-\}", "1"),
    (r"\$\{JOB_COMPLETION_INDEX\}|\$JOB_COMPLETION_INDEX", "1"),
    (r"\$\(date [^)]*\)", "20250101-000000"),
]
_SHELLS = {"sh", "/bin/sh", "bash", "/bin/bash"}
_KEYWORDS = {"if", "then", "else", "elif", "fi", "while", "until", "do", "done", "!"}


# -- reading the manifests ------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs() -> dict[str, list[dict]]:
    """kind -> its objects, from every manifest."""
    found: dict[str, list[dict]] = {}
    for name in MANIFESTS:
        for doc in yaml.safe_load_all((DEPLOY / name).read_text()):
            if doc is not None:
                found.setdefault(doc["kind"], []).append(doc)
    return found


def _one(docs, kind: str) -> dict:
    assert len(docs.get(kind, [])) == 1, f"expected one {kind}, found {len(docs.get(kind, []))}"
    return docs[kind][0]


def _pod_specs(docs) -> dict[str, dict]:
    """The pod templates: the servers' and the workers'."""
    return {"server": _one(docs, "StatefulSet")["spec"]["template"]["spec"],
            "worker": _one(docs, "Job")["spec"]["template"]["spec"]}


def _containers(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def _main(pod: dict) -> dict:
    (container,) = pod["containers"]
    return container


def _mounted_files(pod: dict, container: dict) -> dict[str, tuple[str, str, str]]:
    """Path in the container -> (kind, name, key) of the ConfigMap or Secret item it shows."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        sources = volume.get("projected", {}).get("sources", [])
        sources += [{kind: volume[kind]} for kind in ("configMap", "secret") if kind in volume]
        for source in sources:
            for kind, ref in source.items():
                name = ref.get("name") or ref.get("secretName")
                for item in ref.get("items", []):
                    files[f"{mount['mountPath']}/{item['path']}"] = (kind, name, item["key"])
    return files


def _tinyps_argvs(container: dict) -> list[list[str]]:
    """The arguments of every `tinyps ...` the container runs, directly or in `sh -c`."""
    argv = [*container.get("command", []), *container.get("args", [])]
    if argv and argv[0] in _SHELLS and "-c" in argv:
        commands = _shell_commands(argv[argv.index("-c") + 1])
    else:
        commands = [argv]
    found = []
    for words in commands:
        for i, word in enumerate(words):
            if word == "tinyps" or word.endswith("/tinyps"):
                found.append(words[i + 1:])
                break
            if word == "-m" and words[i + 1: i + 2] == ["tinyps"]:
                found.append(words[i + 2:])
                break
    return found


def _shell_commands(script: str) -> list[list[str]]:
    """A shell script's simple commands as word lists, the shell variables replaced by the
    sample values (any left over fails the test: it would need a sample too)."""
    for pattern, value in SAMPLES:
        script = re.sub(pattern, value, script)
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words: list[str] = []
        for token in lexer:
            if token in _KEYWORDS or set(token) <= set("();<>|&"):
                commands.append(words)
                words = []
            else:
                words.append(token)
        commands.append(words)
    commands = [c for c in commands if c]
    for words in commands:
        assert not any("$" in w for w in words), f"a shell variable without a sample: {words}"
    return commands


def _parse(argv: list[str]):
    try:
        return build_parser().parse_args(argv)
    except SystemExit:  # argparse has printed why
        pytest.fail(f"tinyps refuses this command line: tinyps {shlex.join(argv)}")


def _spec_data(docs) -> dict:
    return json.loads(_one(docs, "ConfigMap")["data"]["cluster.json"])


def _spec(docs, tmp_path) -> ClusterSpec:
    """The ConfigMap's spec, its TLS files (which are checked to exist) put in tmp_path."""
    data = _spec_data(docs)
    for key in ("tls_cert", "tls_key", "tls_ca"):
        if data.get(key):
            stand_in = tmp_path / Path(data[key]).name
            stand_in.touch()
            data[key] = str(stand_in)
    return ClusterSpec.from_dict(data, "configmap.yaml cluster.json")


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# -- the tests ------------------------------------------------------------------------------


def test_every_manifest_parses_and_opens_with_what_it_is_for(docs):
    for name in MANIFESTS:
        text = (DEPLOY / name).read_text()
        assert text.startswith(f"# {name}: "), f"{name} should open with a comment saying " \
                                               f"what it is for"
    for kind, objects in docs.items():
        for doc in objects:
            assert doc.get("apiVersion") and doc["metadata"].get("name"), (kind, doc)
    assert (DEPLOY / "README.md").is_file()
    assert (ROOT / "deploy" / "Dockerfile").is_file()


def test_every_tinyps_command_line_parses_and_reads_the_mounted_spec(docs):
    seen = set()
    for role, pod in _pod_specs(docs).items():
        for container in _containers(pod):
            spec_files = {path for path, (kind, _, key) in _mounted_files(pod, container).items()
                          if kind == "configMap" and key == "cluster.json"}
            for argv in _tinyps_argvs(container):
                args = _parse(argv)
                seen.add(args.command)
                assert args.command == role, f"a {role} pod runs tinyps {args.command}"
                assert args.cluster is not None, f"{argv}: every process reads the spec"
                assert str(args.cluster) in spec_files, (
                    f"--cluster {args.cluster} is not where the ConfigMap's cluster.json is "
                    f"mounted ({sorted(spec_files)})")
                assert args.index is not None
                if role == "server":
                    assert args.host == "0.0.0.0", "a server must listen on the pod's address"
                if getattr(args, "run_dir", None) is not None:
                    assert args.index == 0, "only worker 0 writes the run directory"
                    mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
                    assert any(str(args.run_dir).startswith(m + "/") for m in mounts), (
                        f"--run-dir {args.run_dir} is on no volume")
    assert seen == {"server", "worker"}
    worker_runs = [_parse(a) for a in _tinyps_argvs(_main(_pod_specs(docs)["worker"]))]
    assert any(a.run_dir is not None for a in worker_runs), "worker 0 writes the run directory"


def test_the_spec_agrees_with_the_statefulset_the_service_and_the_job(docs, tmp_path):
    spec = _spec(docs, tmp_path)
    sts, job = _one(docs, "StatefulSet"), _one(docs, "Job")
    (service,) = [s for s in docs["Service"] if s["metadata"]["name"] ==
                  sts["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None", "the servers' Service must be headless"
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()

    assert len(spec.servers) == sts["spec"]["replicas"]
    assert spec.config.workers == job["spec"]["completions"] == job["spec"]["parallelism"]
    assert job["spec"]["completionMode"] == "Indexed"
    name, service_name = sts["metadata"]["name"], service["metadata"]["name"]
    for i, address in enumerate(spec.servers):
        host, _ = _host_port(address)
        # <pod>.<service>[.<namespace>.svc.cluster.local]: the name the pod gets
        assert host.split(".")[:2] == [f"{name}-{i}", service_name], address

    server = _main(_pod_specs(docs)["server"])
    (port,) = {_host_port(a)[1] for a in spec.servers}
    container_ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert port in container_ports.values()
    for p in service["spec"]["ports"]:
        assert p["port"] == port
        assert container_ports.get(p["targetPort"], p["targetPort"]) == port

    # What the spec makes of each server: its port and its checkpoint volume.
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    folder = spec.config.checkpoint.checkpoint_dir
    assert folder in {mounts[c] for c in claims if c in mounts}, (
        "checkpoint_dir must be the server's own volume, so that a restarted pod restores")
    for i in range(len(spec.servers)):
        settings = spec.server_config(i, host="0.0.0.0")
        assert settings.port == port and settings.checkpoint.restore
        assert settings.checkpoint.checkpoint_dir.startswith(folder + "/")


def test_the_tls_files_of_the_spec_are_the_secrets_as_mounted(docs):
    data = _spec_data(docs)
    tls = {data[k] for k in ("tls_cert", "tls_key", "tls_ca") if data.get(k)}
    assert tls, "the manifests run the cluster over TLS"
    for role, pod in _pod_specs(docs).items():
        files = _mounted_files(pod, _main(pod))
        for path in tls:
            assert path in files and files[path][0] == "secret", f"{role}: {path} not mounted"


def test_the_probes_ask_the_servers_at_their_port(docs):
    data = _spec_data(docs)
    (port,) = {_host_port(a)[1] for a in data["servers"]}
    pod = _pod_specs(docs)["server"]
    server = _main(pod)
    files = _mounted_files(pod, server)
    for kind in ("readinessProbe", "livenessProbe"):
        probe = server[kind]
        if "grpc" in probe:  # the kubelet's own probe dials in plaintext
            assert probe["grpc"]["port"] == port
            assert not data.get("tls_cert"), f"{kind}: a grpc probe cannot speak TLS"
            continue
        command = probe["exec"]["command"]
        script, spec_file, address = command[-3:]
        assert files.get(script, ("",))[0] == "configMap", f"{kind}: {script} not mounted"
        assert files.get(spec_file) == ("configMap", "tinyps", "cluster.json")
        assert _host_port(address) == ("127.0.0.1", port), f"{kind} asks {address}"
    (wait,) = _one(docs, "Job")["spec"]["template"]["spec"]["initContainers"]
    files = _mounted_files(_pod_specs(docs)["worker"], wait)
    script, spec_file, flag, seconds = wait["command"][-4:]
    assert files[script][0] == "configMap" and files[spec_file][2] == "cluster.json"
    assert flag == "--wait" and float(seconds) > 0


def test_every_secret_and_configmap_key_referred_to_exists(docs):
    secret, config = _one(docs, "Secret"), _one(docs, "ConfigMap")
    have = {("secret", secret["metadata"]["name"], k)
            for k in {**secret.get("data", {}), **secret.get("stringData", {})}}
    have |= {("configMap", config["metadata"]["name"], k) for k in config["data"]}
    for role, pod in _pod_specs(docs).items():
        for container in _containers(pod):
            for path, ref in _mounted_files(pod, container).items():
                assert ref in have, f"{role}/{container['name']}: {path} shows {ref}"
            for env in container.get("env", []):
                if ref := env.get("valueFrom", {}).get("secretKeyRef"):
                    assert ("secret", ref["name"], ref["key"]) in have, env


def test_the_token_is_never_in_the_configmap_nor_on_a_command_line(docs):
    secret = _one(docs, "Secret")
    token = {**secret.get("data", {}), **secret.get("stringData", {})}["token"]
    config_text = json.dumps(_one(docs, "ConfigMap"))
    assert "token" not in _spec_data(docs) and token not in config_text
    for role, pod in _pod_specs(docs).items():
        for container in _containers(pod):
            line = " ".join([*container.get("command", []), *container.get("args", [])])
            assert "--token" not in line and token not in line, f"{role}: {line}"
            for path, ref in _mounted_files(pod, container).items():
                assert ref[2] != "token", f"{role}: the token is mounted as a file at {path}"
        env = {e["name"]: e for e in _main(pod).get("env", [])}
        assert "value" not in env["TINYPS_TOKEN"], "the token comes from the Secret"
        assert env["TINYPS_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "token"


def test_every_container_asks_for_resources_and_runs_the_local_image(docs):
    for role, pod in _pod_specs(docs).items():
        for container in _containers(pod):
            where = f"{role}/{container['name']}"
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"].get(bound, {})), (
                    f"{where}: no cpu and memory {bound}")
            assert container["image"] == "tinyps:latest", where
            assert container["imagePullPolicy"] == "IfNotPresent", (
                f"{where}: a locally built image must not be pulled")


# -- the probe, for real ----------------------------------------------------------------------


def _run_probe(script: Path, argv: list[str], monkeypatch) -> int:
    monkeypatch.setattr("sys.argv", [str(script), *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    return exit_.value.code


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_the_probe_checks_a_mutual_tls_server_under_its_dns_name(docs, tmp_path, monkeypatch):
    """As in a pod: the server speaks mutual TLS and wants a token; the probe dials
    127.0.0.1 with the spec's TLS files and checks the certificate against the name the
    spec gives this pod's server (tinyps-server-1 -> servers[1])."""
    data = _spec_data(docs)
    domain = data["servers"][0].split(":")[0].split(".", 1)[1]  # tinyps-server.default...
    make_ca(tmp_path, "ca.crt", days=1)  # the file names the spec's Secret mounts
    issue(tmp_path, "tls", [f"DNS:*.{domain}"], ca="ca.crt", cert="tls.crt", days=1)
    for key in ("tls_cert", "tls_key", "tls_ca"):
        data[key] = str(tmp_path / Path(data[key]).name)
    spec_file = tmp_path / "cluster.json"
    spec_file.write_text(json.dumps(data))
    script = tmp_path / "probe.py"
    script.write_text(_one(docs, "ConfigMap")["data"]["probe.py"])

    running = serve(token="s3cret", tls_cert=str(tmp_path / "tls.crt"),
                    tls_key=str(tmp_path / "tls.key"), tls_ca=str(tmp_path / "ca.crt"))
    try:
        monkeypatch.setenv("HOSTNAME", "tinyps-server-1")
        here = f"127.0.0.1:{running.port}"
        assert _run_probe(script, [str(spec_file), here], monkeypatch) == 0
        data["servers"][1] = f"{data['servers'][1].split('.')[0]}.elsewhere:1"
        spec_file.write_text(json.dumps(data))  # a name the certificate does not carry
        assert _run_probe(script, [str(spec_file), here], monkeypatch) == 1
    finally:
        running.stop(0)
    assert _run_probe(script, [str(spec_file), here], monkeypatch) == 1  # nobody there


def test_the_workers_wait_for_every_server_of_the_spec(docs, tmp_path, monkeypatch):
    script = tmp_path / "probe.py"
    script.write_text(_one(docs, "ConfigMap")["data"]["probe.py"])
    servers = [serve() for _ in range(2)]
    try:
        spec_file = tmp_path / "cluster.json"
        spec_file.write_text(json.dumps({"servers": [f"127.0.0.1:{s.port}" for s in servers],
                                         "workers": 1}))
        assert _run_probe(script, [str(spec_file), "--wait", "5"], monkeypatch) == 0
        servers[1].stop(0)
        assert _run_probe(script, [str(spec_file), "--wait", "0"], monkeypatch) == 1
    finally:
        for s in servers:
            s.stop(0)
