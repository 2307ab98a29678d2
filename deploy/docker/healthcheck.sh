#!/bin/bash
# HEALTHCHECK of the outbox-relay image: GET /healthz where the relay listens.
#
# The address is the relay's own: its --http-listen flag (read from PID 1's
# command line; the relay is the image's entrypoint), else
# OUTBOX_RELAY_HTTP_LISTEN (the image sets 0.0.0.0:9187), else the binary's
# default 127.0.0.1:9187. A wildcard address (0.0.0.0, [::]) is asked on
# loopback. With `off` there is nothing to ask: healthy while the container
# runs. An address set only as http_listen in a --config TOML file is not
# seen: set it with the flag or the variable. No curl in the image: bash's
# /dev/tcp speaks the one request. The first argument overrides the command
# line file (for tests).
set -u
cmdline=${1:-/proc/1/cmdline}
listen=""
if [ -r "$cmdline" ]; then
    prev=""
    while IFS= read -r -d '' arg; do
        case "$arg" in
            --http-listen=*) listen=${arg#--http-listen=} ;;
            *) if [ "$prev" = "--http-listen" ]; then listen=$arg; fi ;;
        esac
        prev=$arg
    done < "$cmdline"
fi
listen=${listen:-${OUTBOX_RELAY_HTTP_LISTEN:-127.0.0.1:9187}}
[ "$listen" = off ] && exit 0
host=${listen%:*}
port=${listen##*:}
case "$host" in
    0.0.0.0 | "" | "[::]" | "::") host=127.0.0.1 ;;
esac
host=${host#[}
host=${host%]}
exec 3<>"/dev/tcp/$host/$port" || exit 1
printf 'GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
head -n 1 <&3 | grep -q ' 200 '
