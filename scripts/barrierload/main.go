// Command barrierload drives the barrier's server path against a real etcd
// and a real CoreDNS, with N cheap agents in one Go process:
//
//	barrierload server-path -etcd URL -dns HOST:PORT -n N [-runs R]
//	barrierload fill -etcd URL -n N
//	barrierload load -dns HOST:PORT -name NAME -type SRV [-c 8] [-duration 3s]
//
// server-path: N−1 members are claimed; N stand-in plugin watches (the
// stream each instance's CoreDNS holds on the zone prefix) are opened, and N
// agents each send the one question the agent sends: the SRV set with
// tfzone's hold option (EDNS0 65002: answer once N members are registered,
// at most 10 s), over UDP, or TCP at once when the answer cannot fit. The
// agents hold no etcd watch (discovery/barrier.py). Then the last member is
// claimed. Times run from just before its transaction is sent: until each
// stand-in watch has seen it (what each instance's CoreDNS waits for), and
// until each agent holds a complete answer. One line per run, parsed by
// scripts/bench_barrier:
//
//	server-path-run N=256 run=0 watch_p50_ms=… watch_p99_ms=… answer_p50_ms=… answer_p99_ms=… answer_max_ms=… queries_per_agent=…
//
// fill: claims members 0..N-1 (for the client-path measurement) and exits.
//
// load: a DNS load generator for answers too large for dnsperf's 4096-byte
// EDNS0 buffer (and its TCP mode): C workers ask NAME over UDP with a
// 65000-byte buffer, one question at a time each, for the duration; prints
// "load qps=... latency_ms=... truncated=... errors=...".
//
// Traffic goes only to the given endpoints; every wait is bounded.
package main

import (
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/metadata"
)

type config struct {
	etcd, dnsAddr, path, zone string
	n, runs                   int
	timeout                   time.Duration
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: barrierload server-path|fill [flags]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	var c config
	fs.StringVar(&c.etcd, "etcd", "http://127.0.0.1:2379", "etcd endpoint")
	fs.StringVar(&c.dnsAddr, "dns", "127.0.0.1:53", "CoreDNS address")
	fs.StringVar(&c.path, "path", "/tfcluster-bench", "the cluster's etcd path")
	fs.StringVar(&c.zone, "zone", "tensorflow.local", "the cluster zone")
	fs.IntVar(&c.n, "n", 8, "cluster size")
	fs.IntVar(&c.runs, "runs", 3, "barriers to time")
	fs.DurationVar(&c.timeout, "timeout", 60*time.Second, "bound on each barrier")
	name := fs.String("name", "", "load: the name to ask")
	qtype := fs.String("type", "SRV", "load: the query type")
	workers := fs.Int("c", 8, "load: concurrent workers")
	duration := fs.Duration("duration", 3*time.Second, "load: how long")
	fs.Parse(os.Args[2:])

	var err error
	switch os.Args[1] {
	case "server-path":
		err = serverPath(c)
	case "fill":
		err = fill(c)
	case "load":
		err = load(c.dnsAddr, *name, dns.StringToType[*qtype], *workers, *duration)
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "barrierload:", err)
		os.Exit(1)
	}
}

// labels is the bench's cluster layout: 1 chief, a quarter ps, the rest workers.
func labels(n int) []string {
	ps := max(1, n/4)
	out := []string{"chief0"}
	for i := range ps {
		out = append(out, fmt.Sprintf("ps%d", i))
	}
	for i := range n - 1 - ps {
		out = append(out, fmt.Sprintf("worker%d", i))
	}
	return out
}

// zoneKey is the etcd plugin's key of the zone (reversed labels under path).
func (c config) zoneKey() string {
	l := strings.Split(strings.Trim(c.zone, "."), ".")
	for i, j := 0, len(l)-1; i < j; i, j = i+1, j-1 {
		l[i], l[j] = l[j], l[i]
	}
	return strings.TrimRight(c.path, "/") + "/" + strings.Join(l, "/")
}

func (c config) srvPrefix() string { return c.zoneKey() + "/_tcp/_tensorflow/" }
func (c config) srvName() string   { return "_tensorflow._tcp." + strings.Trim(c.zone, ".") + "." }

// claim writes a member's two keys in one transaction, as registry.py does.
func (c config) claim(ctx context.Context, cli *clientv3.Client, lease clientv3.LeaseID, i int, label string) error {
	value := fmt.Sprintf(`{"host": "127.1.%d.%d", "port": 2222, "ttl": 5}`, i/250, i%250+1)
	record := c.zoneKey() + "/" + label + "/tf"
	srv := c.srvPrefix() + label
	resp, err := cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(record), "=", 0),
			clientv3.Compare(clientv3.CreateRevision(srv), "=", 0)).
		Then(clientv3.OpPut(record, value, clientv3.WithLease(lease)),
			clientv3.OpPut(srv, value, clientv3.WithLease(lease))).
		Commit()
	if err != nil {
		return err
	}
	if !resp.Succeeded {
		return fmt.Errorf("%s is taken", label)
	}
	return nil
}

func (c config) claimAll(ctx context.Context, cli *clientv3.Client, lease clientv3.LeaseID, names []string) error {
	var wg sync.WaitGroup
	errs := make(chan error, len(names))
	sem := make(chan struct{}, 16)
	for i, label := range names {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := c.claim(ctx, cli, lease, i, label); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}

func connect(endpoint string) (*clientv3.Client, error) {
	return clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 5 * time.Second})
}

func fill(c config) error {
	cli, err := connect(c.etcd)
	if err != nil {
		return err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	lease, err := cli.Grant(ctx, 600)
	if err != nil {
		return err
	}
	return c.claimAll(ctx, cli, lease.ID, labels(c.n))
}

// fitsUDP is dns.py's fits_udp with the buffer DNSClient picks: 65000 bytes
// for a server on a loopback address (each instance's own CoreDNS), 4096
// otherwise.
func fitsUDP(n int, loopback bool) bool {
	return 96+96*n <= ednsBuffer(loopback)
}

func ednsBuffer(loopback bool) int {
	if loopback {
		return 65000
	}
	return 4096
}

func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// members counts complete SRV records with glue in one answer.
func members(reply *dns.Msg) int {
	glue := map[string]bool{}
	for _, rr := range reply.Extra {
		if a, ok := rr.(*dns.A); ok {
			glue[strings.ToLower(a.Hdr.Name)] = true
		}
	}
	count := 0
	for _, rr := range reply.Answer {
		if srv, ok := rr.(*dns.SRV); ok && glue[strings.ToLower(srv.Target)] {
			count++
		}
	}
	return count
}

type agentResult struct {
	answer   time.Time
	queries  int
	tooLarge bool // even a TCP answer cannot hold every member
	err      error
}

func serverPath(c config) error {
	// Agents' streams spread over a few connections, as N machines would use N.
	pool := make([]*clientv3.Client, min(16, max(1, c.n/16)))
	for i := range pool {
		cli, err := connect(c.etcd)
		if err != nil {
			return err
		}
		defer cli.Close()
		pool[i] = cli
	}
	cli := pool[0]
	names := labels(c.n)
	for run := range c.runs {
		if err := c.onePath(cli, pool, names, run); err != nil {
			return fmt.Errorf("N=%d run %d: %w", c.n, run, err)
		}
	}
	return nil
}

func (c config) onePath(cli *clientv3.Client, pool []*clientv3.Client, names []string, run int) error {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	if _, err := cli.Delete(ctx, c.path+"/", clientv3.WithPrefix()); err != nil {
		return err
	}
	lease, err := cli.Grant(ctx, 120)
	if err != nil {
		return err
	}
	defer cli.Revoke(context.Background(), lease.ID)
	n := len(names)
	if err := c.claimAll(ctx, cli, lease.ID, names[:n-1]); err != nil {
		return err
	}
	// CoreDNS has seen the first N−1 members, as it would have on a cluster
	// whose last instance is the slow one.
	if err := waitAnswer(ctx, c, names[:n-1]); err != nil {
		return fmt.Errorf("CoreDNS never listed the first %d members: %w", n-1, err)
	}

	watchCtx, stopWatches := context.WithCancel(ctx)
	defer stopWatches()
	var ready, done, seen sync.WaitGroup
	results := make([]agentResult, n)
	watched := make([]time.Time, n)
	for i := range n {
		ready.Add(1)
		seen.Add(1)
		go func() {
			defer seen.Done()
			watched[i] = standin(watchCtx, pool[i%len(pool)], c.zoneKey()+"/", i, &ready)
		}()
	}
	if !waitGroup(&ready, c.timeout) {
		return fmt.Errorf("watches not established within %s", c.timeout)
	}
	for i := range n {
		ready.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			results[i] = c.agent(watchCtx, i, n, &ready)
		}()
	}
	if !waitGroup(&ready, c.timeout) {
		return fmt.Errorf("agents' questions not sent within %s", c.timeout)
	}
	time.Sleep(50 * time.Millisecond) // the questions reach CoreDNS and are held: the scenario
	start := time.Now()
	if err := c.claim(ctx, cli, lease.ID, n-1, names[n-1]); err != nil {
		return err
	}
	if !waitGroup(&done, c.timeout) {
		return fmt.Errorf("agents not done within %s", c.timeout)
	}
	if !waitGroup(&seen, c.timeout) {
		return fmt.Errorf("stand-in watches did not see the claim within %s", c.timeout)
	}
	var watchMs, answerMs []float64
	for _, at := range watched {
		watchMs = append(watchMs, ms(at.Sub(start)))
	}
	queries, tooLarge := 0, 0
	for _, r := range results {
		if r.err != nil {
			return r.err
		}
		queries += r.queries
		if r.tooLarge {
			tooLarge++
			continue
		}
		answerMs = append(answerMs, ms(r.answer.Sub(start)))
	}
	sort.Float64s(watchMs)
	sort.Float64s(answerMs)
	if tooLarge > 0 {
		fmt.Printf("server-path-run N=%d run=%d watch_p50_ms=%.2f watch_p99_ms=%.2f too_large=%d queries_per_agent=%.2f\n",
			n, run, pct(watchMs, 50), pct(watchMs, 99), tooLarge, float64(queries)/float64(n))
		return nil
	}
	fmt.Printf("server-path-run N=%d run=%d watch_p50_ms=%.2f watch_p99_ms=%.2f answer_p50_ms=%.2f answer_p99_ms=%.2f answer_max_ms=%.2f queries_per_agent=%.2f\n",
		n, run, pct(watchMs, 50), pct(watchMs, 99), pct(answerMs, 50), pct(answerMs, 99), answerMs[n-1], float64(queries)/float64(n))
	return nil
}

// agent is one instance's barrier on the wire: one SRV question held by
// tfzone until every member is registered, asked again if the hold runs
// out; ready is signalled once the first question is sent.
func (c config) agent(ctx context.Context, id, n int, ready *sync.WaitGroup) agentResult {
	network := "udp"
	if !fitsUDP(n, isLoopback(c.dnsAddr)) {
		network = "tcp"
	}
	sent := ready.Done
	for queries := 1; ; queries++ {
		hdr, err := askHeader(network, c.dnsAddr, c.srvName(), uint16(ednsBuffer(isLoopback(c.dnsAddr))), n, hold, sent)
		sent = func() {}
		switch {
		case err != nil:
			return agentResult{err: fmt.Errorf("agent %d: %w", id, err)}
		case hdr.Truncated && network == "udp":
			network = "tcp"
		case hdr.Truncated:
			return agentResult{queries: queries, tooLarge: true}
		case int(hdr.Ancount) == n && int(hdr.Arcount) >= n:
			return agentResult{answer: time.Now(), queries: queries}
		case ctx.Err() != nil: // held until the hold ran out, more than once
			return agentResult{err: fmt.Errorf("agent %d: no complete answer", id)}
		}
	}
}

// hold is how long the agents' questions may be held (discovery/barrier.py's default).
const hold = 10 * time.Second

// header is what the server path reads of an answer: its section counts.
// Parsing the records is the client path's cost, measured on its own.
type header struct {
	Truncated        bool
	Ancount, Arcount uint16
}

// askHeader sends one SRV question and reads the reply's header only. The
// question carries tfzone's hold option (65002): answer once wanted records
// are registered, at most hold, as the agent's DNS client asks. sent is
// called once the question is on its way.
func askHeader(network, addr, name string, buffer uint16, wanted int, hold time.Duration, sent func()) (header, error) {
	client := &dns.Client{Net: network, Timeout: 5 * time.Second}
	co, err := client.Dial(addr)
	if err != nil {
		sent()
		return header{}, err
	}
	defer co.Close()
	co.SetDeadline(time.Now().Add(hold + 5*time.Second))
	m := new(dns.Msg)
	m.SetQuestion(name, dns.TypeSRV)
	m.SetEdns0(buffer, false)
	data := make([]byte, 8)
	binary.BigEndian.PutUint32(data, uint32(wanted))
	binary.BigEndian.PutUint32(data[4:], uint32(hold/time.Millisecond))
	opt := m.IsEdns0()
	opt.Option = append(opt.Option, &dns.EDNS0_LOCAL{Code: 65002, Data: data})
	co.UDPSize = buffer
	err = co.WriteMsg(m)
	sent()
	if err != nil {
		return header{}, err
	}
	for {
		var h dns.Header
		raw, err := co.ReadMsgHeader(&h)
		if err != nil {
			return header{}, err
		}
		if h.Id != m.Id || len(raw) < 12 {
			continue // a stray datagram
		}
		return header{
			Truncated: h.Bits&(1<<9) != 0, // dns.Header bits: _TC
			Ancount:   h.Ancount,
			Arcount:   h.Arcount,
		}, nil
	}
}

// standin holds the watch one instance's CoreDNS (tfzone) holds: the zone
// prefix. It returns when it sees the first change after it was set up (the
// last claim), or the zero time if the watch ends first.
func standin(ctx context.Context, cli *clientv3.Client, prefix string, id int, ready *sync.WaitGroup) time.Time {
	ctx = metadata.AppendToOutgoingContext(ctx, "tfcluster-plugin", strconv.Itoa(id))
	signalled := false
	defer func() {
		if !signalled {
			ready.Done()
		}
	}()
	for wr := range cli.Watch(ctx, prefix, clientv3.WithPrefix(), clientv3.WithCreatedNotify()) {
		if wr.Created && !signalled {
			signalled = true
			ready.Done()
		}
		if len(wr.Events) > 0 {
			return time.Now()
		}
	}
	return time.Time{}
}

// waitAnswer waits until CoreDNS answers every one of names: the SRV set
// when a DNS message can hold it, else each name's A record.
func waitAnswer(ctx context.Context, c config, names []string) error {
	client := &dns.Client{Net: "tcp", Timeout: 5 * time.Second}
	ask := func(name string, qtype uint16) (*dns.Msg, error) {
		m := new(dns.Msg)
		m.SetQuestion(name, qtype)
		reply, _, err := client.ExchangeContext(ctx, m, c.dnsAddr)
		return reply, err
	}
	for {
		reply, err := ask(c.srvName(), dns.TypeSRV)
		if err == nil && !reply.Truncated && members(reply) == len(names) {
			return nil
		}
		if err == nil && reply.Truncated { // too large for one message: ask by name
			missing := 0
			for _, name := range names {
				a, err := ask(name+"."+strings.Trim(c.zone, ".")+".", dns.TypeA)
				if err != nil || len(a.Answer) == 0 {
					missing++
				}
			}
			if missing == 0 {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("CoreDNS does not answer all %d names yet (last error %v)", len(names), err)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func waitGroup(wg *sync.WaitGroup, timeout time.Duration) bool {
	ch := make(chan struct{})
	go func() { wg.Wait(); close(ch) }()
	select {
	case <-ch:
		return true
	case <-time.After(timeout):
		return false
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func pct(sorted []float64, p int) float64 {
	i := min(len(sorted)-1, len(sorted)*p/100)
	return sorted[i]
}

func load(addr, name string, qtype uint16, workers int, duration time.Duration) error {
	if name == "" || qtype == 0 {
		return fmt.Errorf("load needs -name and a known -type")
	}
	type tally struct {
		done, truncated, errors int
		latency                 time.Duration
	}
	tallies := make([]tally, workers)
	end := time.Now().Add(duration)
	var wg sync.WaitGroup
	for i := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := &dns.Client{Net: "udp", Timeout: 2 * time.Second, UDPSize: 65000}
			co, err := client.Dial(addr)
			if err != nil {
				tallies[i].errors++
				return
			}
			defer co.Close()
			m := new(dns.Msg)
			m.SetQuestion(dns.Fqdn(name), qtype)
			m.SetEdns0(65000, false)
			for time.Now().Before(end) {
				m.Id = dns.Id()
				start := time.Now()
				co.SetDeadline(start.Add(2 * time.Second))
				if err := co.WriteMsg(m); err != nil {
					tallies[i].errors++
					continue
				}
				var h dns.Header
				if _, err := co.ReadMsgHeader(&h); err != nil || h.Id != m.Id {
					tallies[i].errors++
					continue
				}
				tallies[i].latency += time.Since(start)
				tallies[i].done++
				if h.Bits&(1<<9) != 0 {
					tallies[i].truncated++
				}
			}
		}()
	}
	started := time.Now()
	wg.Wait()
	elapsed := time.Since(started)
	var total tally
	for _, t := range tallies {
		total.done += t.done
		total.truncated += t.truncated
		total.errors += t.errors
		total.latency += t.latency
	}
	if total.done == 0 {
		return fmt.Errorf("no answers (%d errors)", total.errors)
	}
	fmt.Printf("load qps=%.0f latency_ms=%.3f truncated=%d errors=%d\n",
		float64(total.done)/elapsed.Seconds(), ms(total.latency)/float64(total.done), total.truncated, total.errors)
	return nil
}
