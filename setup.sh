#!/usr/bin/env bash
# Set up sendense-nbd on Debian 12 (as root) and run something with it.
#
#   ./setup.sh run    install, then run the main job end-to-end (examples/main_job.py);
#                     ./setup.sh run --keep leaves the hub and its web console up until Ctrl-C;
#                     ./setup.sh run --ceph puts the hub's repository on a test Ceph cluster (RBD)
#   ./setup.sh test   install, then run the whole test suite
#   ./setup.sh        install only
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"

DEBIAN_PACKAGES=(
    qemu-utils nbdkit nbdkit-plugin-python libnbd-bin nbd-server python3-libnbd time
    openssh-client openssh-server python3 python3-venv python3-pip
    # The console's browser tests: headless chromium (driven by Playwright) and fonts it renders text with
    # (--no-install-recommends leaves fonts-liberation out).
    chromium fonts-liberation fonts-dejavu-core
    # Ceph (pacific): the test cluster (simulator/ceph_cluster.py), the RBD device's python3-rbd/python3-rados
    # (system Python only: the venv has system site-packages) and qemu's rbd: driver for the peers.
    ceph-mon ceph-mgr ceph-osd ceph-common radosgw python3-rbd python3-rados qemu-block-extra
    # PostgreSQL 15, the store several hubs share (--db postgresql://...): the test cluster
    # (simulator/postgres_cluster.py runs it as the package's postgres user) and psycopg 3 (system Python).
    postgresql python3-psycopg
)

# The second test pass, under PostgreSQL: a subset of tests/hub (the whole of it costs over 5 minutes here)
# that goes through every store path: jobs and points (api, job_record, jobs_query, hub_backup, retention,
# verify_jobs), ports (api), policies, schedule state and runs (scheduler, policy_cli), nodes, alerts,
# samples, metrics, space history and capacity; and two hubs sharing the database refusing the delete of a
# copy that one of them uploads (tests/offsite/test_hub_copies_cluster.py).
POSTGRES_PASS=(
    tests/hub/test_api.py tests/hub/test_job_record.py tests/hub/test_jobs_query.py tests/hub/test_hub_backup.py
    tests/hub/test_retention.py tests/hub/test_verify_jobs.py tests/hub/test_scheduler.py tests/hub/test_policy_cli.py
    tests/hub/test_nodes.py tests/hub/test_alerts.py tests/hub/test_samples.py tests/hub/test_metrics.py
    tests/hub/test_space_history.py tests/hub/test_capacity.py tests/offsite/test_hub_copies_cluster.py
)

install_debian_packages() {
    local missing=()
    for pkg in "${DEBIAN_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        echo "setup: installing Debian packages: ${missing[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

install_venv() {
    # Debian's python3 with system site-packages: python3-libnbd (the peer our
    # tests drive) and python3-rbd/python3-rados only import there.
    if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c 'import nbd, rbd, rados, psycopg' 2>/dev/null; then
        rm -rf .venv
        /usr/bin/python3 -m venv --system-site-packages .venv
    fi
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
}

install_debian_packages
install_venv
# The vSphere simulator the backup tests and the main job run against (Go, built offline).
simulator/build-vcsim.sh >/dev/null

case "${1:-}" in
    run) exec .venv/bin/python examples/main_job.py "${@:2}" ;;
    test)
        # The whole suite (hubs on SQLite; the store's own tests on both), then the hub tests that reach
        # every store path again with each hub's store in PostgreSQL (docs/DATABASE.md); fails if either does.
        status=0
        .venv/bin/python -m pytest -q -p no:cacheprovider tests || status=$?
        SENDENSE_TEST_DB=postgresql .venv/bin/python -m pytest -q -p no:cacheprovider "${POSTGRES_PASS[@]}" || status=$?
        exit "$status" ;;
    "") echo "setup: done; next: ./setup.sh run, or ./setup.sh test" >&2 ;;
    *) echo "usage: $0 [run|test]" >&2; exit 2 ;;
esac
