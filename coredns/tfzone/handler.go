package tfzone

import (
	"context"

	"github.com/coredns/coredns/plugin"
	"github.com/coredns/coredns/request"

	"github.com/miekg/dns"
)

// ServeDNS implements plugin.Handler; it answers as the etcd plugin does
// (plugin/etcd/handler.go), through CoreDNS's generic ServiceBackend look-ups.
func (t *TFZone) ServeDNS(ctx context.Context, w dns.ResponseWriter, r *dns.Msg) (int, error) {
	opt := plugin.Options{}
	state := request.Request{W: w, Req: r}

	zone := plugin.Zones(t.Zones).Matches(state.Name())
	if zone == "" {
		return plugin.NextOrFailure(t.Name(), t.Next, ctx, w, r)
	}

	var (
		records, extra []dns.RR
		truncated      bool
		err            error
	)
	switch state.QType() {
	case dns.TypeA:
		records, truncated, err = plugin.A(ctx, t, zone, state, nil, opt)
	case dns.TypeAAAA:
		records, truncated, err = plugin.AAAA(ctx, t, zone, state, nil, opt)
	case dns.TypeTXT:
		records, truncated, err = plugin.TXT(ctx, t, zone, state, nil, opt)
	case dns.TypeCNAME:
		records, err = plugin.CNAME(ctx, t, zone, state, opt)
	case dns.TypeSRV:
		records, extra, err = plugin.SRV(ctx, t, zone, state, opt)
	case dns.TypeSOA:
		records, err = plugin.SOA(ctx, t, zone, state, opt)
	case dns.TypeNS:
		if state.Name() == zone {
			records, extra, err = plugin.NS(ctx, t, zone, state, opt)
			break
		}
		fallthrough
	default:
		// A look-up tells NODATA from NXDOMAIN.
		_, _, err = plugin.A(ctx, t, zone, state, nil, opt)
	}
	if err != nil && t.IsNameError(err) {
		if t.Fall.Through(state.Name()) {
			return plugin.NextOrFailure(t.Name(), t.Next, ctx, w, r)
		}
		return plugin.BackendError(ctx, t, zone, dns.RcodeNameError, state, nil, opt)
	}
	if err != nil {
		return plugin.BackendError(ctx, t, zone, dns.RcodeServerFailure, state, err, opt)
	}
	if len(records) == 0 {
		return plugin.BackendError(ctx, t, zone, dns.RcodeSuccess, state, nil, opt)
	}

	m := new(dns.Msg)
	m.SetReply(r)
	m.Truncated = truncated
	m.Authoritative = true
	m.Answer = records
	m.Extra = extra
	w.WriteMsg(m)
	return dns.RcodeSuccess, nil
}

// Name implements plugin.Handler.
func (t *TFZone) Name() string { return "tfzone" }
