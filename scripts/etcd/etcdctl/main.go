// Command etcdctl is etcd's command-line client, built from its released Go
// module alongside the server.
package main

import "go.etcd.io/etcd/etcdctl/v3/ctlv3"

func main() {
	ctlv3.MustStart()
}
