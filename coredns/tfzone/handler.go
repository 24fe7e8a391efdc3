package tfzone

import (
	"context"
	"encoding/binary"

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

	// One snapshot serves the whole query. A positive answer built from it
	// is kept with it as wire bytes, so N agents asking for the same
	// membership set at the same moment cost one build and one packing, and
	// a change of the set (a new snapshot) starts afresh.
	view := t.view.Load()
	key := wireKey{r.Question[0].Name, state.QType(), r.IsEdns0() != nil, state.Do(), state.Size()}
	if packed, ok := view.wire.Load(key); ok {
		writeWire(w, r, packed.([]byte))
		return dns.RcodeSuccess, nil
	}
	ctx = context.WithValue(ctx, viewKey{}, view)

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
	if opt := r.IsEdns0(); opt != nil {
		m.SetEdns0(opt.UDPSize(), opt.Do())
	}
	// Packed once for this snapshot and this client's buffer: truncated (TC
	// set) when it cannot fit, as the server's writer would.
	m.Compress = true
	m.Truncate(key.size)
	packed, err := m.Pack()
	if err != nil {
		return plugin.BackendError(ctx, t, zone, dns.RcodeServerFailure, state, err, opt)
	}
	view.wire.Store(key, packed)
	writeWire(w, r, packed)
	return dns.RcodeSuccess, nil
}

// viewKey carries the query's snapshot to Records, so that one query reads one state.
type viewKey struct{}

// wireKey is what a packed answer depends on besides the snapshot: the
// question as asked (case kept, so the echoed question matches), EDNS0, and
// the size the reply must fit (the client's UDP buffer; 64 KiB over TCP).
type wireKey struct {
	name  string
	qtype uint16
	edns  bool
	do    bool
	size  int
}

// writeWire sends a packed answer with this request's id and RD bit.
func writeWire(w dns.ResponseWriter, r *dns.Msg, packed []byte) {
	out := make([]byte, len(packed))
	copy(out, packed)
	binary.BigEndian.PutUint16(out, r.Id)
	if r.RecursionDesired {
		out[2] |= 0x01
	} else {
		out[2] &^= 0x01
	}
	w.Write(out)
}

// Name implements plugin.Handler.
func (t *TFZone) Name() string { return "tfzone" }
