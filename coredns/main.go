// Command coredns is a minimal CoreDNS build for tfcluster: only the plugins
// the cluster zone needs, so the binary stays small and its attack surface
// stays known. The directive order below is the order plugins see a query.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/etcd"
	_ "github.com/coredns/coredns/plugin/file"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"

	_ "tfcluster/coredns/tfzone"
)

// directives is the plugin order (setup and query chain); it lists exactly
// the plugins imported above. tfzone (ours, in tfzone/) serves the cluster
// zone from an etcd watch; the stock etcd plugin stays for records read
// straight from etcd, and file serves a zone file (the serving benchmark's
// baseline). bind is one more addition to the design's list:
// on an instance 127.0.0.53:53 belongs to systemd-resolved, and on one machine
// each simulated instance's CoreDNS needs its own address, so CoreDNS must
// listen on a chosen address rather than on every interface.
var directives = []string{
	"reload",
	"bind",
	"ready",
	"health",
	"prometheus",
	"errors",
	"log",
	"cache",
	"hosts",
	"file",
	"etcd",
	"tfzone",
	"loop",
	"forward",
}

func init() {
	dnsserver.Directives = directives
}

func main() {
	coremain.Run()
}
