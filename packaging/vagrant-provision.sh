#!/bin/sh
# Provisions the Vagrant VMs (see the Vagrantfile): `mesh` or `app`.
set -eu

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@"
}

mesh() {
    # What the scenario tests and the service run with: the runtime part of PACKAGES in
    # xtask/src/setup.rs. The compilers (clang, llvm, libbpf-dev, linux-libc-dev) stay on the
    # host, which builds; the bench tools are not used here.
    apt_install iproute2 bpftool util-linux dnsutils curl dnsmasq-base tcpdump openssl procps \
        iptables

    bin=/vagrant/target/release/interceptor
    if [ ! -x "$bin" ]; then
        echo "$bin is missing: build on the host first (cargo xtask vagrant-test does)" >&2
        exit 1
    fi
    # The layout of `cargo xtask install`, without the example mesh: the cross-VM check writes
    # the mesh file it needs.
    install -m755 "$bin" /usr/local/bin/interceptor
    install -m644 /vagrant/packaging/interceptor.service /etc/systemd/system/interceptor.service
    install -d -m755 /etc/interceptor/mesh
    # These VMs have no mesh identity: run without mTLS.
    sed 's/^certs:/# certs:/' /vagrant/packaging/config.yaml >/etc/interceptor/config.yaml
    chmod 644 /etc/interceptor/config.yaml
    grep -q '^# certs:' /etc/interceptor/config.yaml
    systemctl daemon-reload
    # Installed, not enabled: the cross-VM check starts and stops it.
}

app() {
    apt_install python3
    install -d -m755 /srv/app
    echo "hello from app-vm" >/srv/app/hello.txt
    cat >/etc/systemd/system/app-http.service <<'UNIT'
[Unit]
Description=test HTTP server for the interceptor cross-VM check
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=/usr/bin/python3 -m http.server 8080 --directory /srv/app
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
    systemctl daemon-reload
    systemctl enable --now app-http.service
}

case "${1:-}" in
mesh) mesh ;;
app) app ;;
*)
    echo "usage: $0 mesh|app" >&2
    exit 2
    ;;
esac
