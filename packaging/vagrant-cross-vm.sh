#!/bin/sh
# Cross-VM check, run as root on mesh-vm by `cargo xtask vagrant-test`: the installed service
# makes a name only the mesh knows reach app-vm; stopped, it leaves nothing attached and
# traffic flowing.
set -eu
APP=192.168.56.11
NAME=app.default.svc.cluster.local

fail() {
    echo "cross-VM check: $*" >&2
    journalctl -u interceptor --no-pager -n 40 >&2 || true
    systemctl stop interceptor || true
    exit 1
}

# A VM kept from an earlier run must run the binary just built, not the provisioned one.
install -m755 /vagrant/target/release/interceptor /usr/local/bin/interceptor
cat >/etc/interceptor/mesh/app-vm.yaml <<YAML
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: app, namespace: default}
spec:
  hosts: [$NAME]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {app: app}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: app-vm, namespace: default}
spec:
  address: $APP
  labels: {app: app}
YAML
interceptor check --mesh /etc/interceptor/mesh/app-vm.yaml

systemctl daemon-reload
# Type=notify: this returns once the programs are attached and the listeners are up.
systemctl start interceptor || fail "interceptor.service did not start"

# The name is in no DNS but the mesh table: an answer proves DNS and connection capture.
got=$(curl -sS -m 5 "http://$NAME:8080/hello.txt") || fail "curl http://$NAME:8080/ failed"
[ "$got" = "hello from app-vm" ] || fail "unexpected answer: $got"
echo "ok: $NAME reached app-vm through interceptor.service"

systemctl stop interceptor
# SIGTERM is a clean stop (exit 0): inactive, not failed.
if systemctl is-failed --quiet interceptor; then
    fail "interceptor.service failed on stop"
fi
# systemd attaches programs of its own (device, firewall); these are the interceptor's.
left=$(bpftool cgroup tree |
    grep -E '\b(connect[46]|sendmsg[46]|recvmsg[46]|getpeername[46]|publish_orig_dst)\b' || true)
[ -z "$left" ] || fail "programs still attached after stop: $left"
echo "ok: nothing left attached"

# Fail-open: with the service stopped, app-vm is reached directly.
curl -sS -m 5 -o /dev/null "http://$APP:8080/hello.txt" || fail "app-vm unreachable after stop"
echo "ok: traffic flows with the service stopped"
