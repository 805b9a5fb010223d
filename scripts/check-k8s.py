"""Checks infra/k8s (run by tests/tests/container.rs, in the venv scripts/ensure-containers.sh
makes): every manifest against the Kubernetes API schema (kubernetes-validate, strict: an
unknown or misplaced field fails), and against the binaries it runs:

- the kustomization lists every manifest of the folder, and only those;
- every container runs one of the image's binaries, from the image the kustomization names;
- every SPILLWAY_* variable (and DATABASE_URL) given to a container is one its binary reads,
  as `BINARY --help` lists it (`[env: NAME=]`); a ConfigMap key must be read by some
  container that takes the ConfigMap;
- a container's probes name one of its ports;
- terminationGracePeriodSeconds leaves room for the preStop pause plus
  SPILLWAY_SHUTDOWN_GRACE_SECS, so a draining process is not killed.

Usage: check-k8s.py MANIFEST_DIR BIN_DIR KUBERNETES_VERSION. Prints what it checked; exits 1
naming every problem.
"""

import pathlib
import re
import subprocess
import sys

import kubernetes_validate
import yaml

BINARIES = ("spillway", "spillway-ingest", "spillway-worker")


def main() -> int:
    manifests, bin_dir, version = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
    problems: list[str] = []
    kustomization = yaml.safe_load((manifests / "kustomization.yaml").read_text())
    listed = set(kustomization.get("resources", []))
    files = {p.name for p in manifests.glob("*.yaml")} - {"kustomization.yaml"}
    if listed != files:
        problems.append(f"kustomization resources {sorted(listed)} != files {sorted(files)}")
    image = kustomization["images"][0]["name"]

    docs = []
    for name in sorted(files):
        for doc in yaml.safe_load_all((manifests / name).read_text()):
            if doc:
                docs.append((name, doc))
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{name} {doc['kind']}: {e.message} at {list(e.path)}")

    reads = {b: env_names(bin_dir / b) for b in BINARIES}
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for _, d in docs if d["kind"] == "ConfigMap"}
    config_readers: dict[str, set[str]] = {m: set() for m in config_maps}
    containers = 0
    for name, doc in docs:
        if doc["kind"] not in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        for c in pod["containers"]:
            containers += 1
            where = f"{name} {doc['metadata']['name']}/{c['name']}"
            if c.get("image") != image:
                problems.append(f"{where}: image {c.get('image')!r}, not {image!r}")
            binary = (c.get("command") or ["spillway-ingest"])[0]
            if binary not in BINARIES:
                problems.append(f"{where}: runs {binary!r}, not one of {BINARIES}")
                continue
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            for src in c.get("envFrom", []):
                ref = src.get("configMapRef", {}).get("name")
                if ref in config_maps:
                    config_readers[ref] |= reads[binary]
                    for k, v in config_maps[ref].items():
                        env.setdefault(k, v)
            for var in c.get("env", []):
                if is_setting(var["name"]) and var["name"] not in reads[binary]:
                    problems.append(f"{where}: {binary} does not read {var['name']}")
            ports = {p["name"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if port is not None and port not in ports:
                    problems.append(f"{where}: {probe} port {port!r} is not one of {sorted(ports)}")
            grace = int(env.get("SPILLWAY_SHUTDOWN_GRACE_SECS") or 25)
            pause = pre_stop_pause(c)
            allowed = pod.get("terminationGracePeriodSeconds", 30)
            if pause + grace >= allowed:
                problems.append(
                    f"{where}: preStop {pause} s + shutdown grace {grace} s >= "
                    f"terminationGracePeriodSeconds {allowed}: the drain would be killed"
                )
    for m, data in config_maps.items():
        for k in data:
            if is_setting(k) and k not in config_readers[m]:
                problems.append(f"ConfigMap {m}: no container that takes it reads {k}")

    for p in problems:
        print(f"PROBLEM: {p}")
    print(
        f"checked {len(docs)} resources against Kubernetes {version} (strict), "
        f"{containers} containers against {', '.join(BINARIES)} --help: "
        f"{len(problems)} problem(s)"
    )
    return 1 if problems else 0


def is_setting(name: str) -> bool:
    return name.startswith("SPILLWAY_") or name == "DATABASE_URL"


def env_names(binary: pathlib.Path) -> set[str]:
    """The variables a binary reads: clap lists each as `[env: NAME=…]` in --help, for the
    binary and each of its subcommands (the CLI's settings live on them)."""
    names: set[str] = set()
    todo = [[]]
    seen = set()
    while todo:
        args = todo.pop()
        out = subprocess.run([str(binary), *args, "--help"], capture_output=True, text=True, check=True).stdout
        names |= set(re.findall(r"\[env: ([A-Z0-9_]+)[=\]]", out))
        if binary.name == "spillway" and not args:
            in_commands = False
            for line in out.splitlines():
                if line.strip() == "Commands:":
                    in_commands = True
                elif in_commands and line.strip() == "":
                    break
                elif in_commands:
                    sub = line.split()[0]
                    if sub != "help" and sub not in seen:
                        seen.add(sub)
                        todo.append([sub])
    return names


def pre_stop_pause(container: dict) -> int:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] == "sleep":
        return int(command[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
