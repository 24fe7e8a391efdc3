// Package tfzone serves a tfcluster zone from memory. It watches the
// cluster's etcd prefix (the etcd plugin's key layout: reversed labels under
// a path, SkyDNS JSON values) and answers from the last state the watch
// delivered, so a query costs no etcd round trip and no lease look-up. A
// record whose lease expires or is revoked arrives as a watch delete and
// leaves the answers at once; nothing is cached, so nothing is stale or
// negatively cached beyond the watch's own delay.
package tfzone

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"time"

	"github.com/coredns/coredns/plugin"
	"github.com/coredns/coredns/plugin/etcd/msg"
	"github.com/coredns/coredns/plugin/pkg/fall"
	clog "github.com/coredns/coredns/plugin/pkg/log"
	"github.com/coredns/coredns/plugin/pkg/upstream"
	"github.com/coredns/coredns/request"

	"github.com/miekg/dns"
	etcdcv3 "go.etcd.io/etcd/client/v3"
)

const (
	defaultPriority = 10 // as the etcd plugin: priority when a record sets none
	defaultTTL      = 300
	etcdTimeout     = 5 * time.Second
	retryDelay      = 500 * time.Millisecond
)

var (
	log            = clog.NewWithPlugin("tfzone")
	errKeyNotFound = errors.New("key not found")
)

// TFZone is the plugin: a ServiceBackend over an in-memory view of etcd.
type TFZone struct {
	Next       plugin.Handler
	Fall       fall.F
	Zones      []string
	PathPrefix string
	// TTL is the answer TTL of records whose value sets none, and the SOA
	// minimum of negative answers.
	TTL      uint32
	Upstream *upstream.Upstream
	Client   *etcdcv3.Client

	view    atomic.Pointer[snapshot]
	changed atomic.Pointer[chan struct{}] // closed when the view is replaced
	synced  atomic.Bool
	cancel  context.CancelFunc
	done    chan struct{}
}

// New returns a plugin with an empty view; Start fills it.
func New() *TFZone {
	t := &TFZone{PathPrefix: "skydns", TTL: defaultTTL, Upstream: upstream.New()}
	t.view.Store(&snapshot{})
	changed := make(chan struct{})
	t.changed.Store(&changed)
	return t
}

// setView replaces the view and wakes the questions held for a complete set.
func (t *TFZone) setView(view *snapshot) {
	t.view.Store(view)
	next := make(chan struct{})
	close(*t.changed.Swap(&next))
}

// viewWith returns the first view holding at least wanted records at or
// below key, waiting at most hold for the watch to deliver it (then the
// latest view, whatever it holds).
func (t *TFZone) viewWith(ctx context.Context, key string, wanted int, hold time.Duration) *snapshot {
	timer := time.NewTimer(hold)
	defer timer.Stop()
	for {
		changed := *t.changed.Load()
		view := t.view.Load()
		if view.count(key) >= wanted {
			return view
		}
		select {
		case <-changed:
		case <-timer.C:
			return t.view.Load()
		case <-ctx.Done():
			return t.view.Load()
		}
	}
}

// prefix is the etcd prefix watched: the path, with a trailing slash.
func (t *TFZone) prefix() string {
	return "/" + strings.Trim(t.PathPrefix, "/") + "/"
}

// Start lists the prefix and then follows it with a watch, until Stop.
func (t *TFZone) Start() error {
	ctx, cancel := context.WithCancel(context.Background())
	t.cancel = cancel
	t.done = make(chan struct{})
	go t.run(ctx)
	return nil
}

// Stop ends the watch and closes the etcd client.
func (t *TFZone) Stop() error {
	if t.cancel != nil {
		t.cancel()
		<-t.done
	}
	if t.Client != nil {
		return t.Client.Close()
	}
	return nil
}

// Ready implements ready.Readiness: ready once the first listing is in memory.
func (t *TFZone) Ready() bool { return t.synced.Load() }

// run keeps the view in step with etcd: list at revision R, watch from R+1;
// on any watch failure (etcd restarted, history compacted, no leader) list
// again. Between a failure and the next listing the last view is served.
func (t *TFZone) run(ctx context.Context) {
	defer close(t.done)
	for ctx.Err() == nil {
		rev, err := t.list(ctx)
		if err != nil {
			if ctx.Err() == nil {
				log.Warningf("listing %s: %v; retrying", t.prefix(), err)
				select {
				case <-ctx.Done():
				case <-time.After(retryDelay):
				}
			}
			continue
		}
		t.synced.Store(true)
		t.follow(ctx, rev)
	}
}

// list replaces the view with everything under the prefix; returns its revision.
func (t *TFZone) list(ctx context.Context) (int64, error) {
	lctx, cancel := context.WithTimeout(ctx, etcdTimeout)
	defer cancel()
	resp, err := t.Client.Get(lctx, t.prefix(), etcdcv3.WithPrefix())
	if err != nil {
		return 0, err
	}
	view := &snapshot{entries: make([]entry, 0, len(resp.Kvs))}
	for _, kv := range resp.Kvs { // etcd returns a prefix range sorted by key
		serv, err := decode(string(kv.Key), kv.Value)
		if err != nil {
			log.Warning(err)
			continue
		}
		view.entries = append(view.entries, entry{string(kv.Key), serv})
	}
	t.setView(view)
	return resp.Header.Revision, nil
}

// follow applies watch events after rev until the watch fails or ctx ends.
func (t *TFZone) follow(ctx context.Context, rev int64) {
	wctx, cancel := context.WithCancel(etcdcv3.WithRequireLeader(ctx))
	defer cancel()
	for resp := range t.Client.Watch(wctx, t.prefix(), etcdcv3.WithPrefix(), etcdcv3.WithRev(rev+1)) {
		if err := resp.Err(); err != nil {
			log.Warningf("watch on %s: %v; listing again", t.prefix(), err)
			return
		}
		view := t.view.Load()
		for _, ev := range resp.Events {
			key := string(ev.Kv.Key)
			if ev.Type == etcdcv3.EventTypeDelete {
				view = view.without(key)
				continue
			}
			serv, err := decode(key, ev.Kv.Value)
			if err != nil {
				log.Warning(err)
				view = view.without(key)
				continue
			}
			view = view.with(key, serv)
		}
		t.setView(view)
	}
}

// Services implements plugin.ServiceBackend.
func (t *TFZone) Services(ctx context.Context, state request.Request, exact bool, _ plugin.Options) ([]msg.Service, error) {
	services, err := t.Records(ctx, state, exact)
	if err != nil {
		return nil, err
	}
	return msg.Group(services), nil
}

// Reverse implements plugin.ServiceBackend.
func (t *TFZone) Reverse(ctx context.Context, state request.Request, exact bool, opt plugin.Options) ([]msg.Service, error) {
	return t.Services(ctx, state, exact, opt)
}

// Lookup implements plugin.ServiceBackend (names outside the zone, e.g. CNAME targets).
func (t *TFZone) Lookup(ctx context.Context, state request.Request, name string, typ uint16) (*dns.Msg, error) {
	return t.Upstream.Lookup(ctx, state, name, typ)
}

// IsNameError implements plugin.ServiceBackend.
func (t *TFZone) IsNameError(err error) bool { return errors.Is(err, errKeyNotFound) }

// Serial implements plugin.ServiceBackend.
func (t *TFZone) Serial(request.Request) uint32 {
	return uint32(time.Now().Unix()) // #nosec G115 -- as the etcd plugin: Unix time as SOA serial
}

// MinTTL implements plugin.ServiceBackend: the SOA minimum of negative answers.
func (t *TFZone) MinTTL(request.Request) uint32 { return t.TTL }

// Records implements plugin.ServiceBackend: the services at or below the
// queried name, from memory, as the etcd plugin would read them from etcd.
func (t *TFZone) Records(ctx context.Context, state request.Request, exact bool) ([]msg.Service, error) {
	view, ok := ctx.Value(viewKey{}).(*snapshot)
	if !ok {
		view = t.view.Load()
	}
	found, ok := view.lookup(msg.Path(state.Name(), t.PathPrefix), exact)
	if !ok {
		return nil, errKeyNotFound
	}
	seen := make(map[msg.Service]struct{}, len(found))
	services := make([]msg.Service, 0, len(found))
	for _, e := range found {
		serv := e.serv
		if _, dup := seen[serv]; dup {
			continue
		}
		seen[serv] = struct{}{}
		if serv.TTL == 0 {
			serv.TTL = t.TTL
		}
		if serv.Host != "" || (state.QType() == dns.TypeTXT && serv.Text != "") {
			services = append(services, serv)
		}
	}
	return services, nil
}
