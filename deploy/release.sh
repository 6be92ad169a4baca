#!/usr/bin/env bash
# The release steps on the Pi: the one definition that `make deploy` (over ssh) and the Ansible
# playbook (`make deploy-fleet`) both run, as root, from a staged release folder.
#
#   release.sh install STAGE   install STAGE as a release, switch `current` to it, restart the
#                              units, health-check; roll back automatically when that fails
#   release.sh rollback        switch back to the previous release (restart, health-check)
#   release.sh health          health-check the current release (units, predict, bench)
#   release.sh status          current and previous release, releases on disk
#
# The last line of install and rollback is `RESULT: <deployed|unchanged|rolled-back|failed> ...`,
# which the desktop and the playbook summarise per host. Exit status 0 means the Pi runs the
# release that was asked for and it is healthy.
#
# Settings (environment; the desktop forwards any it has set):
#   CTPI_PREFIX           /opt/ctpi             releases/, venvs/, wheels/, current, previous
#   CTPI_SERVICE_MANAGER  systemctl             called as `$CTPI_SERVICE_MANAGER restart UNIT...`,
#                                               `is-active --quiet UNIT`, `status`, `enable`, `daemon-reload`;
#                                               the tests point it at tests/servicectl.py, which runs the units
#   CTPI_UNIT_DIR         /etc/systemd/system   where systemd/*.service of the release go (with
#                                               /opt/ctpi, /var/lib/ctpi and /etc/ctpi replaced by these settings)
#   CTPI_SERVICE_USER     ctpi                  created as a system user when absent
#   CTPI_DATA_DIR         /var/lib/ctpi         inbox/ and state/, owned by the service user
#   CTPI_CONFIG_DIR       /etc/ctpi             where the units' ctpi.toml is read (CTPI_CONFIG in each unit)
#   CTPI_PYTHON           python3               the interpreter the virtualenv is made from
#   CTPI_HEALTH_TIMEOUT   30                    seconds a unit may take to become active
#   CTPI_BENCH_RUNS       20                    `ctpi bench --runs` in the health check (0: skip)
#   CTPI_KEEP_RELEASES    3                     releases kept besides current and previous
set -Eeuo pipefail
# A step that fails outside the guarded switch below still ends with a RESULT line.
trap '[ -n "${RESULTED:-}" ] || result "failed (line $LINENO: $BASH_COMMAND)"' ERR

PREFIX=${CTPI_PREFIX:-/opt/ctpi}
SERVICE_MANAGER=${CTPI_SERVICE_MANAGER:-systemctl}
UNIT_DIR=${CTPI_UNIT_DIR:-/etc/systemd/system}
SERVICE_USER=${CTPI_SERVICE_USER:-ctpi}
DATA_DIR=${CTPI_DATA_DIR:-/var/lib/ctpi}
CONFIG_DIR=${CTPI_CONFIG_DIR:-/etc/ctpi}
PYTHON=${CTPI_PYTHON:-python3}
HEALTH_TIMEOUT=${CTPI_HEALTH_TIMEOUT:-30}
BENCH_RUNS=${CTPI_BENCH_RUNS:-20}
KEEP_RELEASES=${CTPI_KEEP_RELEASES:-3}

say() { echo "ctpi-release: $*"; }
result() { echo "RESULT: $*"; RESULTED=1; }
die() { echo "ctpi-release: error: $*" >&2; result "failed ($*)"; exit 1; }
# Word splitting is wanted: CTPI_SERVICE_MANAGER may be "systemctl --user".
sm() { $SERVICE_MANAGER "$@"; }

units_of() { # release folder -> unit names, one per line
  local unit
  for unit in "$1"/systemd/*.service; do
    [ -e "$unit" ] && basename "$unit"
  done
  return 0
}

link_target() { readlink "$PREFIX/$1" 2>/dev/null || true; }

switch_link() { # name target: point $PREFIX/name at target atomically (rename over the old link)
  ln -sfn "$2" "$PREFIX/.$1.tmp"
  mv -T "$PREFIX/.$1.tmp" "$PREFIX/$1"
}

ensure_folders() {
  install -d -m 0755 "$PREFIX" "$PREFIX/releases" "$PREFIX/venvs" "$PREFIX/wheels" "$PREFIX/incoming"
  if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
    local groups="" group
    for group in video render; do # the camera (ctpi capture) needs video
      getent group "$group" >/dev/null && groups="${groups:+$groups,}$group"
    done
    useradd --system --user-group --home-dir "$DATA_DIR" --no-create-home --shell /usr/sbin/nologin \
      ${groups:+--groups "$groups"} "$SERVICE_USER"
    say "created service user $SERVICE_USER"
  fi
  local group_name
  group_name=$(id -gn "$SERVICE_USER")
  install -d -m 0755 -o "$SERVICE_USER" -g "$group_name" "$DATA_DIR"
  install -d -m 0770 -o "$SERVICE_USER" -g "$group_name" "$DATA_DIR/inbox"
  install -d -m 0750 -o "$SERVICE_USER" -g "$group_name" "$DATA_DIR/state"
}

ensure_venv() { # release folder: link release/venv to the virtualenv for its requirements
  local release=$1 key venv lock
  # The release's lock for this Pi's Python and machine (requirements/pi-cp311-aarch64.txt on
  # Raspberry Pi OS Bookworm): pip constraints, so the Pi gets exactly the pinned versions.
  lock="$release/requirements/pi-$("$PYTHON" -c 'import sys, platform; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}")').txt"
  [ -f "$lock" ] || die "the release has no lock for this Pi ($(basename "$lock")): add it on the desktop (deploy/locks.py) and run make lock"
  key=$({ "$PYTHON" -c 'import sys; print(sys.version)'; cat "$release/requirements.txt" "$lock"; } | sha256sum | cut -c1-16)
  venv="$PREFIX/venvs/$key"
  if [ ! -e "$venv/.complete" ]; then
    rm -rf "$venv"
    say "creating virtualenv venvs/$key from $(basename "$lock") (--system-site-packages: apt's python3-picamera2 stays visible)"
    "$PYTHON" -m venv --system-site-packages "$venv"
    # --no-compile, then compileall on every core: pip byte-compiles one file after another,
    # which was most of the install (x86, 2 cores: 19.9 s -> 14.7 s for the same 3,756 .pyc;
    # under QEMU three quarters of it). The bytecode is made here because the units, running
    # as ctpi, cannot write it into this root-owned virtualenv.
    if compgen -G "$PREFIX/wheels/*.whl" >/dev/null; then
      # Only the wheelhouse the desktop built for this Pi: no index, no pip config.
      PIP_CONFIG_FILE=/dev/null "$venv/bin/pip" install --quiet --no-compile --no-index --find-links "$PREFIX/wheels" \
        -r "$release/requirements.txt" -c "$lock"
    else
      say "no wheelhouse in $PREFIX/wheels: installing from the package index (the Pi needs the network)"
      "$venv/bin/pip" install --quiet --no-compile -r "$release/requirements.txt" -c "$lock"
    fi
    # A file that does not compile (a package's Python 2 example, say) is skipped, as pip does.
    "$venv/bin/python" -m compileall -q -j 0 "$venv/lib" >/dev/null 2>&1 || say "bytecode: some files of the virtualenv did not compile (skipped, as pip would)"
    touch "$venv/.complete"
  fi
  ln -sfn "../../venvs/$key" "$release/venv"
}

write_launchers() { # release/bin/{ctpi,python,streamlit}: this release's code with its virtualenv
  local release=$1 name
  mkdir -p "$release/bin"
  for name in ctpi python streamlit; do
    {
      echo '#!/bin/sh'
      echo '# Runs with the release this file is in (symlinks such as current/ resolved once, at start).'
      echo 'release=$(dirname "$(dirname "$(readlink -f "$0")")")'
      echo 'export PYTHONPATH="$release${PYTHONPATH:+:$PYTHONPATH}"'
      case $name in
        ctpi) echo 'exec "$release/venv/bin/python" -m device.cli "$@"' ;;
        python) echo 'exec "$release/venv/bin/python" "$@"' ;;
        streamlit) echo 'exec "$release/venv/bin/python" -m streamlit "$@"' ;;
      esac
    } >"$release/bin/$name"
    chmod 0755 "$release/bin/$name"
  done
}

install_units() { # release folder: copy its units (with the prefix substituted) when they differ
  local release=$1 unit changed=0
  mkdir -p "$UNIT_DIR"
  for unit in $(units_of "$release"); do
    sed -e "s|/opt/ctpi|$PREFIX|g" -e "s|/var/lib/ctpi|$DATA_DIR|g" -e "s|/etc/ctpi|$CONFIG_DIR|g" "$release/systemd/$unit" >"$UNIT_DIR/.$unit.tmp"
    if cmp -s "$UNIT_DIR/.$unit.tmp" "$UNIT_DIR/$unit"; then
      rm -f "$UNIT_DIR/.$unit.tmp"
    else
      mv -f "$UNIT_DIR/.$unit.tmp" "$UNIT_DIR/$unit"
      changed=1
    fi
  done
  if [ "$changed" = 1 ]; then sm daemon-reload; fi
  local units
  units=$(units_of "$release")
  if [ -n "$units" ]; then sm enable --quiet $units; fi
}

retire_units() { # from-release to-release: stop and remove units the new one no longer has
  local unit
  [ -n "$1" ] && [ -d "$1" ] || return 0
  for unit in $(units_of "$1"); do
    if [ ! -e "$2/systemd/$unit" ]; then
      sm disable --now "$unit" || true
      rm -f "$UNIT_DIR/$unit"
      say "retired unit $unit"
    fi
  done
}

restart_units() {
  local units
  units=$(units_of "$1")
  if [ -n "$units" ]; then
    say "restarting $(echo $units)"
    sm restart $units
  fi
}

units_status() { # release folder: the service manager's status (state, PID, log tail) of each unit not active
  local unit
  for unit in $(units_of "$1"); do
    sm is-active --quiet "$unit" && continue
    sm status --no-pager --lines 20 "$unit" 2>&1 | sed 's/^/    /' || true
  done
}

units_active() { # release folder, seconds to wait for each
  local unit waited
  for unit in $(units_of "$1"); do
    waited=0
    until sm is-active --quiet "$unit"; do
      if [ "$waited" -ge "$2" ]; then
        say "health: unit $unit is not active after ${2}s"
        sm status --no-pager --lines 20 "$unit" 2>&1 | sed 's/^/    /' || true
        return 1
      fi
      sleep 1
      waited=$((waited + 1))
    done
    say "health: unit $unit active"
  done
}

health() { # [bench]: the current release serves: units active, predict on the known slice, bench
  local current="$PREFIX/current" output model found=0
  units_active "$current" "$HEALTH_TIMEOUT" || return 1
  for model in "$current"/models/*/; do
    [ -e "$model/manifest.json" ] || continue
    found=1
    model=${model%/}
    if ! output=$("$current/bin/ctpi" predict --model "$model" "$current/health/slice.png" 2>&1); then
      say "health: ctpi predict with models/${model##*/} on the release's known slice failed:"
      echo "$output" | sed 's/^/    /'
      return 1
    fi
    say "health: ctpi predict with models/${model##*/} on health/slice.png:"
    echo "$output" | sed 's/^/    /'
    if [ "${1:-}" = bench ] && [ "$BENCH_RUNS" -gt 0 ]; then
      say "health: ctpi bench --runs $BENCH_RUNS"
      if ! "$current/bin/ctpi" bench --model "$model" --runs "$BENCH_RUNS" 2>&1 | sed 's/^/    /'; then
        say "health: ctpi bench failed"
        return 1
      fi
    fi
  done
  if [ "$found" = 0 ]; then
    say "health: the release has no model bundle under models/"
    return 1
  fi
  # Once more: a unit that crashed right after starting is not healthy.
  units_active "$current" 0 || return 1
  # The page's self-signed certificate (made at its first start): staff compare this with the browser's.
  if [ -f "$DATA_DIR/state/tls/cert.pem" ]; then
    say "health: page certificate SHA-256 $(openssl x509 -noout -fingerprint -sha256 -in "$DATA_DIR/state/tls/cert.pem" | cut -d= -f2)"
  fi
}

prune() { # keep current, previous and the newest KEEP_RELEASES; drop virtualenvs no release uses
  local keep release used venv
  rm -f "$PREFIX"/incoming/[0-9]*.tar # release archives the playbook copied (wheel archives stay)
  keep=" $(basename "$(link_target current)") $(basename "$(link_target previous)") "
  for release in $(ls -1t "$PREFIX/releases" | tail -n +"$((KEEP_RELEASES + 1))"); do
    case $keep in *" $release "*) continue ;; esac
    rm -rf "${PREFIX:?}/releases/$release"
    say "pruned release $release"
  done
  used=" "
  for release in "$PREFIX"/releases/*/venv; do
    [ -L "$release" ] && used="$used$(basename "$(readlink "$release")") "
  done
  for venv in "$PREFIX"/venvs/*; do
    [ -d "$venv" ] || continue
    case $used in *" $(basename "$venv") "*) ;; *) rm -rf "$venv" && say "pruned virtualenv venvs/$(basename "$venv")" ;; esac
  done
}

lock() {
  install -d -m 0755 "$PREFIX"
  exec 9>>"$PREFIX/.lock"
  flock -n 9 || die "another deploy or rollback is running on this Pi"
}

activate() { # release old-current: units in, links switched, units restarted; 1 on any failure
  local release=$1 old_current=$2
  retire_units "${old_current:+$PREFIX/$old_current}" "$release" || return 1
  install_units "$release" || return 1
  if [ -n "$old_current" ]; then switch_link previous "$old_current" || return 1; fi
  switch_link current "releases/$(basename "$release")" || return 1
  say "current -> releases/$(basename "$release")"
  if ! restart_units "$release"; then
    say "restart failed"
    units_status "$release" # why: the unit's own process exited, or never said it was ready
    return 1
  fi
}

cmd_install() {
  local stage=${1:?usage: release.sh install STAGE}
  [ -f "$stage/VERSION" ] || die "$stage is not a staged release (no VERSION)"
  local version release old_current old_previous
  version=$(cat "$stage/VERSION")
  release="$PREFIX/releases/$version"
  lock
  old_current=$(link_target current)
  old_previous=$(link_target previous)

  if [ "$old_current" = "releases/$version" ] && [ -e "$release/.complete" ]; then
    [ "$(readlink -f "$stage")" = "$(readlink -f "$release")" ] || rm -rf "$stage"
    say "release $version is already current: nothing to change"
    if health; then result "unchanged $version"; return 0; fi
    result "failed (release $version is current but unhealthy; nothing was changed)"
    return 1
  fi

  ensure_folders
  if [ ! -e "$release/.complete" ]; then
    rm -rf "$release"
    mv -T "$stage" "$release" # same filesystem (incoming/ is under the prefix): a rename
    ensure_venv "$release"
    write_launchers "$release"
    # Bytecode now, so a release never changes on disk after it is installed (and starts faster).
    "$release/venv/bin/python" -m compileall -q "$release/device" >/dev/null
    touch "$release/.complete"
    say "installed release $version"
  else
    [ "$(readlink -f "$stage")" = "$(readlink -f "$release")" ] || rm -rf "$stage"
    say "release $version is on disk already (deployed before); switching back to it"
  fi

  # From here on every failure (units that will not enable or restart, as `systemctl restart`
  # reports for a unit that fails to start, or a failed health check) leads to the rollback.
  if activate "$release" "$old_current" && health bench; then
    prune
    result "deployed $version${old_current:+ (previous $(basename "$old_current"))}"
    return 0
  fi
  if [ -z "$old_current" ]; then
    result "failed $version (health check failed; no previous release to roll back to)"
    return 1
  fi
  say "health check failed: rolling back to $(basename "$old_current")"
  retire_units "$release" "$PREFIX/$old_current" || true
  install_units "$PREFIX/$old_current" || true
  switch_link current "$old_current"
  if [ -n "$old_previous" ]; then switch_link previous "$old_previous"; else rm -f "$PREFIX/previous"; fi
  restart_units "$PREFIX/$old_current" || true
  if health; then
    result "rolled-back $version -> $(basename "$old_current")"
  else
    result "rolled-back $version -> $(basename "$old_current") (which is unhealthy too)"
  fi
  return 1
}

cmd_rollback() {
  lock
  local current previous
  current=$(link_target current)
  previous=$(link_target previous)
  [ -n "$previous" ] && [ -e "$PREFIX/$previous/.complete" ] || die "no previous release to roll back to"
  retire_units "$PREFIX/$current" "$PREFIX/$previous"
  install_units "$PREFIX/$previous"
  switch_link current "$previous"
  switch_link previous "$current"
  say "current -> $previous"
  restart_units "$PREFIX/$previous" || say "restart failed"
  if health; then
    result "rolled-back $(basename "$current") -> $(basename "$previous")"
    return 0
  fi
  result "failed (rolled back to $(basename "$previous"), but it is unhealthy)"
  return 1
}

cmd_status() {
  echo "current:  $(basename "$(link_target current)")"
  echo "previous: $(basename "$(link_target previous)")"
  echo "releases: $(ls -1t "$PREFIX/releases" 2>/dev/null | tr '\n' ' ')"
}

case ${1:-} in
  install) shift; cmd_install "$@" ;;
  rollback) cmd_rollback ;;
  health) [ -e "$PREFIX/current" ] || die "no release installed under $PREFIX"; health bench ;;
  status) cmd_status ;;
  *) echo "usage: release.sh install STAGE | rollback | health | status" >&2; exit 2 ;;
esac
