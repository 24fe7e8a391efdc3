package tfzone

import (
	"context"
	"encoding/binary"
	"sync"
	"time"

	"github.com/coredns/coredns/plugin"
	"github.com/coredns/coredns/plugin/etcd/msg"
	"github.com/coredns/coredns/request"

	"github.com/miekg/dns"
)

// maxKept bounds the packed answers kept per view: questions for names that
// do not exist could otherwise grow it until the next change.
const maxKept = 4096

// MembersOption is the EDNS0 option (local use range) by which an agent asks
// for a set of records once it is complete: 8 bytes, big endian, the number
// of records wanted at or below the question's name (uint32), then how long
// the question may be held for them in milliseconds (uint32, at most
// MaxHold). The question is answered the moment the view holds that many,
// else when the time is up, from the view it has then. An agent waiting at
// its barrier asks for the membership set with the cluster's size: it holds
// no etcd watch of its own, and hears of the last claim as soon as this
// plugin's watch delivers it.
const MembersOption = 65002

// MaxHold bounds how long a question is held.
const MaxHold = 30 * time.Second

// requestedMembers is what a request's MembersOption asks: the records
// wanted (0: none asked) and how long to hold the question for them.
func requestedMembers(r *dns.Msg) (int, time.Duration) {
	opt := r.IsEdns0()
	if opt == nil {
		return 0, 0
	}
	for _, o := range opt.Option {
		if local, ok := o.(*dns.EDNS0_LOCAL); ok && local.Code == MembersOption && len(local.Data) == 8 {
			wanted := int(binary.BigEndian.Uint32(local.Data))
			hold := time.Duration(binary.BigEndian.Uint32(local.Data[4:])) * time.Millisecond
			return wanted, min(hold, MaxHold)
		}
	}
	return 0, 0
}

// ServeDNS implements plugin.Handler; it answers as the etcd plugin does
// (plugin/etcd/handler.go), through CoreDNS's generic ServiceBackend look-ups.
//
// One view serves the whole query. A positive answer built from it is kept
// with it as wire bytes: N agents asking for the membership set at the same
// moment cost one build and one packing (the first builds, the others wait
// for it), and a change of the set (a new view) starts afresh.
func (t *TFZone) ServeDNS(ctx context.Context, w dns.ResponseWriter, r *dns.Msg) (int, error) {
	state := request.Request{W: w, Req: r}
	zone := plugin.Zones(t.Zones).Matches(state.Name())
	if zone == "" {
		return plugin.NextOrFailure(t.Name(), t.Next, ctx, w, r)
	}
	view := t.view.Load()
	if wanted, hold := requestedMembers(r); wanted > 0 {
		view = t.viewWith(ctx, msg.Path(state.Name(), t.PathPrefix), wanted, hold)
	}
	ctx = context.WithValue(ctx, viewKey{}, view)
	key := wireKey{r.Question[0].Name, state.QType(), r.IsEdns0() != nil, state.Do(), state.Size()}
	if kept := view.kept(key); kept != nil {
		kept.once.Do(func() { kept.packed = t.pack(ctx, state, zone, key.size) })
		if kept.packed != nil {
			writeWire(w, r, kept.packed)
			return dns.RcodeSuccess, nil
		}
	}
	return t.serve(ctx, w, state, zone)
}

// keptAnswer is one question's packed positive answer for one view; packed
// stays nil when the answer is not positive (it is then served afresh).
type keptAnswer struct {
	once   sync.Once
	packed []byte
}

// kept returns the view's entry for key, creating it while there is room.
func (s *snapshot) kept(key wireKey) *keptAnswer {
	if v, ok := s.wire.Load(key); ok {
		return v.(*keptAnswer)
	}
	if s.keptCount.Add(1) > maxKept {
		return nil
	}
	v, _ := s.wire.LoadOrStore(key, &keptAnswer{})
	return v.(*keptAnswer)
}

// lookup runs the generic backend look-up for the question's type.
func (t *TFZone) lookup(ctx context.Context, state request.Request, zone string) (records, extra []dns.RR, truncated bool, err error) {
	opt := plugin.Options{}
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
	return records, extra, truncated, err
}

// pack builds the positive answer and packs it for a reply of at most size
// bytes (truncated, TC set, when it cannot fit: as the server's writer
// would); nil when the answer is not positive.
func (t *TFZone) pack(ctx context.Context, state request.Request, zone string, size int) []byte {
	records, extra, truncated, err := t.lookup(ctx, state, zone)
	if err != nil || len(records) == 0 {
		return nil
	}
	m := reply(state.Req, records, extra, truncated)
	if opt := state.Req.IsEdns0(); opt != nil {
		m.SetEdns0(opt.UDPSize(), opt.Do())
	}
	m.Compress = true
	m.Truncate(size)
	packed, err := m.Pack()
	if err != nil {
		return nil
	}
	return packed
}

// serve answers without keeping anything: negative answers and errors.
func (t *TFZone) serve(ctx context.Context, w dns.ResponseWriter, state request.Request, zone string) (int, error) {
	opt := plugin.Options{}
	records, extra, truncated, err := t.lookup(ctx, state, zone)
	if err != nil && t.IsNameError(err) {
		if t.Fall.Through(state.Name()) {
			return plugin.NextOrFailure(t.Name(), t.Next, ctx, w, state.Req)
		}
		return plugin.BackendError(ctx, t, zone, dns.RcodeNameError, state, nil, opt)
	}
	if err != nil {
		return plugin.BackendError(ctx, t, zone, dns.RcodeServerFailure, state, err, opt)
	}
	if len(records) == 0 {
		return plugin.BackendError(ctx, t, zone, dns.RcodeSuccess, state, nil, opt)
	}
	w.WriteMsg(reply(state.Req, records, extra, truncated))
	return dns.RcodeSuccess, nil
}

func reply(r *dns.Msg, records, extra []dns.RR, truncated bool) *dns.Msg {
	m := new(dns.Msg)
	m.SetReply(r)
	m.Truncated = truncated
	m.Authoritative = true
	m.Answer = records
	m.Extra = extra
	return m
}

// viewKey carries the query's view to Records, so that one query reads one state.
type viewKey struct{}

// wireKey is what a packed answer depends on besides the view: the
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
