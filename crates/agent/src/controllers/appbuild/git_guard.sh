# Sourced by the resolve and clone steps before git connects (see `GIT_HOST_GUARD` in
# jobs.rs). Everything it reads comes from the environment (GIT_URL, GIT_HOST, GIT_PORT, set
# by the agent); nothing is spliced into the script. Runs with busybox (alpine/git) as with
# dash and mawk or gawk.
: "${SB_TERMINATION_LOG:=/dev/termination-log}"
sb_fail() {
  printf '%s\n' "$1" > "$SB_TERMINATION_LOG"
  printf '%s\n' "$1" >&2
  exit 3
}
# Reads addresses, one a line, on stdin; prints the first that the clone must not reach
# (loopback, unspecified, link-local, cloud metadata) with why, and fails; or succeeds.
sb_check_addresses() {
  awk '
function hexval(s,   i, v, d) {
  v = 0
  for (i = 1; i <= length(s); i++) {
    d = index("0123456789abcdef", substr(s, i, 1))
    if (d == 0) return -1
    v = v * 16 + d - 1
  }
  return v
}
function v4(a,   p, i) {
  if (split(a, p, ".") != 4) return "is not an address"
  for (i = 1; i <= 4; i++) if (p[i] !~ /^[0-9]+$/ || p[i] + 0 > 255) return "is not an address"
  if (p[1] == 127) return "is a loopback address (this node)"
  if (p[1] == 0) return "is an unspecified address (this node)"
  if (p[1] == 169 && p[2] == 254) return "is a link-local address (cloud instance metadata)"
  if (a == "100.100.100.200" || a == "168.63.129.16") return "is a cloud metadata address"
  if (a == "255.255.255.255") return "is the broadcast address"
  return ""
}
function v6(a,   g, h, t, q, nh, nt, i, n, tail, cut, zero6, x) {
  a = tolower(a)
  sub(/%.*/, "", a)
  if (a ~ /[.]/) {
    tail = a
    sub(/.*:/, "", tail)
    if (v4(tail) == "is not an address") return "is not an address"
    split(tail, q, ".")
    a = substr(a, 1, length(a) - length(tail)) sprintf("%x:%x", q[1] * 256 + q[2], q[3] * 256 + q[4])
  }
  if (a !~ /^[0-9a-f:]+$/) return "is not an address"
  cut = index(a, "::")
  if (cut) {
    nh = cut > 1 ? split(substr(a, 1, cut - 1), h, ":") : 0
    nt = cut + 2 <= length(a) ? split(substr(a, cut + 2), t, ":") : 0
    if (nh + nt > 7) return "is not an address"
    n = 0
    for (i = 1; i <= nh; i++) g[++n] = h[i]
    for (i = nh + nt; i < 8; i++) g[++n] = "0"
    for (i = 1; i <= nt; i++) g[++n] = t[i]
  } else if (split(a, g, ":") != 8) return "is not an address"
  for (i = 1; i <= 8; i++) {
    if (length(g[i]) < 1 || length(g[i]) > 4) return "is not an address"
    g[i] = hexval(g[i])
  }
  zero6 = g[1] + g[2] + g[3] + g[4] + g[5] + g[6] == 0
  if (zero6 && g[7] == 0 && g[8] == 0) return "is an unspecified address (this node)"
  if (zero6 && g[7] == 0 && g[8] == 1) return "is a loopback address (this node)"
  if (g[1] >= 65152 && g[1] <= 65215) return "is a link-local address"
  if (g[1] == 64768 && g[2] == 3778 && g[3] + g[4] + g[5] + g[6] + g[7] == 0 && g[8] == 596) return "is AWS instance metadata"
  if (zero6 || (g[1] + g[2] + g[3] + g[4] + g[5] == 0 && g[6] == 65535) || (g[1] == 100 && g[2] == 65435 && g[3] + g[4] + g[5] + g[6] == 0)) {
    x = v4(int(g[7] / 256) "." g[7] % 256 "." int(g[8] / 256) "." g[8] % 256)
    if (x != "") return "carries an IPv4 address that " x
  }
  return ""
}
{
  gsub(/^[ \t]+|[ \t]+$/, "")
  if ($0 == "") next
  # Only address characters (and a zone name): what passes here may be pinned into a command.
  if ($0 ~ /[^0-9A-Za-z:.%]/) why = "is not an address"
  else why = $0 ~ /:/ ? v6($0) : v4($0)
  if (why != "") { print $0 " " why; bad = 1; exit }
}
END { exit bad }'
}
# Adds one git config entry through the environment (GIT_CONFIG_COUNT), never the command line.
sb_git_config() {
  sb_n=${GIT_CONFIG_COUNT:-0}
  eval "GIT_CONFIG_KEY_$sb_n=\$1 GIT_CONFIG_VALUE_$sb_n=\$2; export GIT_CONFIG_KEY_$sb_n GIT_CONFIG_VALUE_$sb_n"
  GIT_CONFIG_COUNT=$((sb_n + 1))
  export GIT_CONFIG_COUNT
}
# Resolves GIT_HOST as this pod's resolver does, refuses forbidden addresses, and pins git
# (curl for https, ssh for SSH) to the addresses it checked.
sb_guard_git_host() {
  case "$GIT_HOST" in
    '' | -* | *[!A-Za-z0-9._:-]*) sb_fail "refused: the git host \"$GIT_HOST\" is not a host name" ;;
  esac
  case "$GIT_PORT" in
    '' | *[!0-9]*) sb_fail "refused: the git port \"$GIT_PORT\" is not a number" ;;
  esac
  sb_git_config http.followRedirects false
  # An address is checked as it is and needs no lookup or pin.
  if printf '%s\n' "$GIT_HOST" | sb_check_addresses > /dev/null; then return 0; fi
  sb_addrs=$({ getent ahosts "$GIT_HOST" || getent hosts "$GIT_HOST"; } 2>/dev/null | awk '{ print $1 }' | sort -u)
  [ -n "$sb_addrs" ] || sb_fail "cannot resolve the git host $GIT_HOST (it is resolved and checked before git connects)"
  if ! sb_why=$(printf '%s\n' "$sb_addrs" | sb_check_addresses); then
    sb_fail "refused: the git host $GIT_HOST resolves to $sb_why"
  fi
  # Connect to the addresses just checked: a second lookup could answer differently.
  sb_addrs=$(printf '%s\n' "$sb_addrs" | awk '!/:/' ; printf '%s\n' "$sb_addrs" | awk '/:/')
  case "$GIT_URL" in
    https://*)
      sb_git_config http.curloptResolve "$GIT_HOST:$GIT_PORT:$(printf '%s\n' "$sb_addrs" | awk '/:/ { $0 = "[" $0 "]" } { printf "%s%s", (NR > 1 ? "," : ""), $0 }')"
      ;;
    *)
      sb_alias=$GIT_HOST
      [ "$GIT_PORT" = 22 ] || sb_alias="[$GIT_HOST]:$GIT_PORT"
      GIT_SSH_COMMAND="${GIT_SSH_COMMAND:-ssh} -o HostName=$(printf '%s\n' "$sb_addrs" | head -n 1) -o 'HostKeyAlias=$sb_alias'"
      export GIT_SSH_COMMAND
      ;;
  esac
}
