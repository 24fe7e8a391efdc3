package tfzone

import (
	"strconv"

	"github.com/coredns/caddy"
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/plugin"

	etcdcv3 "go.etcd.io/etcd/client/v3"
)

func init() { plugin.Register("tfzone", setup) }

func setup(c *caddy.Controller) error {
	t, endpoints, err := parse(c)
	if err != nil {
		return plugin.Error("tfzone", err)
	}
	client, err := etcdcv3.New(etcdcv3.Config{
		Endpoints:         endpoints,
		DialKeepAliveTime: etcdTimeout,
	})
	if err != nil {
		return plugin.Error("tfzone", err)
	}
	t.Client = client
	c.OnStartup(t.Start)
	c.OnShutdown(t.Stop)
	dnsserver.GetConfig(c).AddPlugin(func(next plugin.Handler) plugin.Handler {
		t.Next = next
		return t
	})
	return nil
}

// parse reads the plugin's block; see README.md for the syntax.
func parse(c *caddy.Controller) (*TFZone, []string, error) {
	t := New()
	endpoints := []string{"http://localhost:2379"}
	blocks := 0
	for c.Next() {
		if blocks++; blocks > 1 {
			return nil, nil, plugin.ErrOnce
		}
		t.Zones = plugin.OriginsFromArgsOrServerBlock(c.RemainingArgs(), c.ServerBlockKeys)
		for c.NextBlock() {
			switch c.Val() {
			case "path":
				if !c.NextArg() {
					return nil, nil, c.ArgErr()
				}
				t.PathPrefix = c.Val()
			case "endpoint":
				args := c.RemainingArgs()
				if len(args) == 0 {
					return nil, nil, c.ArgErr()
				}
				endpoints = args
			case "ttl":
				if !c.NextArg() {
					return nil, nil, c.ArgErr()
				}
				ttl, err := strconv.ParseUint(c.Val(), 10, 32)
				if err != nil || ttl == 0 {
					return nil, nil, c.Errf("ttl must be a whole number of seconds > 0, not %q", c.Val())
				}
				t.TTL = uint32(ttl)
			case "fallthrough":
				t.Fall.SetZonesFromArgs(c.RemainingArgs())
			default:
				return nil, nil, c.Errf("unknown property %q", c.Val())
			}
		}
	}
	return t, endpoints, nil
}
