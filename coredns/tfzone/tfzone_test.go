package tfzone

import (
	"context"
	"encoding/binary"
	"fmt"
	"testing"
	"time"

	"github.com/coredns/coredns/plugin/etcd/msg"
	"github.com/coredns/coredns/plugin/test"

	"github.com/miekg/dns"
)

const path = "/tfcluster-t"

// fill builds a view as the watch would, from key/value pairs in any order.
func fill(t *testing.T, z *TFZone, kv map[string]string) {
	t.Helper()
	view := z.view.Load()
	for key, value := range kv {
		serv, err := decode(key, []byte(value))
		if err != nil {
			t.Fatal(err)
		}
		view = view.with(key, serv)
	}
	z.view.Store(view)
}

func newZone() *TFZone {
	z := New()
	z.Zones = []string{"tensorflow.local."}
	z.PathPrefix = path
	z.TTL = 5
	return z
}

func member(label, ip string) map[string]string {
	value := fmt.Sprintf(`{"host": %q, "port": 2222, "ttl": 5}`, ip)
	return map[string]string{
		path + "/local/tensorflow/" + label + "/tf":          value,
		path + "/local/tensorflow/_tcp/_tensorflow/" + label: value,
	}
}

// recorder keeps the reply, whether written as a message or as wire bytes.
type recorder struct {
	test.ResponseWriter
	msg *dns.Msg
}

func (r *recorder) WriteMsg(m *dns.Msg) error {
	r.msg = m
	return nil
}

func (r *recorder) Write(b []byte) (int, error) {
	r.msg = new(dns.Msg)
	return len(b), r.msg.Unpack(b)
}

func ask(t *testing.T, z *TFZone, name string, qtype uint16) *dns.Msg {
	t.Helper()
	return askSized(t, z, name, qtype, 65000)
}

// askSized asks with an EDNS0 buffer of size bytes (0: no EDNS0, 512 bytes).
func askSized(t *testing.T, z *TFZone, name string, qtype uint16, size uint16) *dns.Msg {
	t.Helper()
	var reply *dns.Msg
	for range 2 { // the second reply comes from the packed answer kept with the snapshot
		req := new(dns.Msg)
		req.SetQuestion(name, qtype)
		if size > 0 {
			req.SetEdns0(size, false)
		}
		req.Id = 4242
		rec := &recorder{}
		if _, err := z.ServeDNS(context.Background(), rec, req); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if rec.msg == nil || rec.msg.Id != 4242 {
			t.Fatalf("%s: no reply, or not to this request: %v", name, rec.msg)
		}
		if rec.msg.Rcode == dns.RcodeSuccess && (!rec.msg.Authoritative || rec.msg.Question[0].Name != name) {
			t.Fatalf("%s: reply %v", name, rec.msg)
		}
		if reply != nil && rec.msg.Rcode == dns.RcodeSuccess && reply.String() != rec.msg.String() {
			t.Fatalf("%s: the kept answer differs from the first:\n%v\n%v", name, reply, rec.msg)
		}
		reply = rec.msg
	}
	return reply
}

func TestViewKeepsKeysSortedThroughInsertsAndDeletes(t *testing.T) {
	view := &snapshot{}
	for _, key := range []string{"/p/c", "/p/a", "/p/b", "/p/a"} {
		view = view.with(key, serv(key))
	}
	view = view.without("/p/b").without("/p/missing")
	var keys []string
	for _, e := range view.entries {
		keys = append(keys, e.key)
	}
	if fmt.Sprint(keys) != "[/p/a /p/c]" {
		t.Fatalf("keys = %v", keys)
	}
}

func TestLookupReadsTheSubtreeThenTheKeyItself(t *testing.T) {
	view := &snapshot{}
	for _, key := range []string{"/p/x/a/tf", "/p/x/ab/tf", "/p/x/b"} {
		view = view.with(key, serv(key))
	}
	if found, ok := view.lookup("/p/x/a", false); !ok || len(found) != 1 || found[0].key != "/p/x/a/tf" {
		t.Fatalf("subtree of a: %v %v (ab must not match)", found, ok)
	}
	if found, ok := view.lookup("/p/x/b", false); !ok || len(found) != 1 {
		t.Fatalf("leaf b: %v %v", found, ok)
	}
	if _, ok := view.lookup("/p/x/a", true); ok {
		t.Fatal("exact look-up of a name with only children found something")
	}
	if _, ok := view.lookup("/p/x/c", false); ok {
		t.Fatal("missing name found")
	}
}

func TestARecordAndNXDOMAIN(t *testing.T) {
	z := newZone()
	fill(t, z, member("ps0", "127.0.9.1"))
	reply := ask(t, z, "ps0.tensorflow.local.", dns.TypeA)
	if reply.Rcode != dns.RcodeSuccess || len(reply.Answer) != 1 {
		t.Fatalf("A ps0: %v", reply)
	}
	if a := reply.Answer[0].(*dns.A); a.A.String() != "127.0.9.1" || a.Hdr.Ttl != 5 {
		t.Fatalf("A ps0: %v", a)
	}
	if reply := ask(t, z, "worker9.tensorflow.local.", dns.TypeA); reply.Rcode != dns.RcodeNameError {
		t.Fatalf("A worker9: rcode %d, want NXDOMAIN", reply.Rcode)
	}
}

func TestOneSRVAnswerListsEveryMemberWithGlue(t *testing.T) {
	z := newZone()
	for i := range 100 {
		fill(t, z, member(fmt.Sprintf("worker%d", i), fmt.Sprintf("127.0.10.%d", i+1)))
	}
	reply := ask(t, z, "_tensorflow._tcp.tensorflow.local.", dns.TypeSRV)
	if len(reply.Answer) != 100 || glue(reply) != 100 {
		t.Fatalf("SRV: %d answers, %d glue; want 100 each", len(reply.Answer), glue(reply))
	}
	small := askSized(t, z, "_tensorflow._tcp.tensorflow.local.", dns.TypeSRV, 0)
	if !small.Truncated || len(small.Answer) >= 100 {
		t.Fatalf("SRV in 512 bytes: TC=%v with %d answers; want TC and fewer", small.Truncated, len(small.Answer))
	}
	fill(t, z, member("worker100", "127.0.11.1"))
	if again := ask(t, z, "_tensorflow._tcp.tensorflow.local.", dns.TypeSRV); len(again.Answer) != 101 {
		t.Fatalf("SRV after a claim: %d answers, want 101 (an answer outlived its snapshot)", len(again.Answer))
	}
	srv := reply.Answer[0].(*dns.SRV)
	if srv.Port != 2222 || srv.Target != "worker0._tensorflow._tcp.tensorflow.local." {
		t.Fatalf("SRV: %v", srv)
	}
}

func TestADeleteRemovesTheName(t *testing.T) {
	z := newZone()
	fill(t, z, member("ps0", "127.0.9.1"))
	if reply := ask(t, z, "ps0.tensorflow.local.", dns.TypeA); len(reply.Answer) != 1 {
		t.Fatalf("A ps0 before delete: %v", reply)
	}
	z.view.Store(z.view.Load().without(path + "/local/tensorflow/ps0/tf"))
	if reply := ask(t, z, "ps0.tensorflow.local.", dns.TypeA); reply.Rcode != dns.RcodeNameError {
		t.Fatalf("A ps0 after delete: rcode %d, want NXDOMAIN", reply.Rcode)
	}
}

func glue(m *dns.Msg) int {
	count := 0
	for _, rr := range m.Extra {
		if _, ok := rr.(*dns.A); ok {
			count++
		}
	}
	return count
}

func serv(key string) msg.Service {
	s, _ := decode(key, []byte(`{"host": "127.0.0.1"}`))
	return s
}

// BenchmarkSRV256 is one membership query of a 256-member cluster over TCP
// (built and packed once per snapshot, then copied).
func BenchmarkSRV256(b *testing.B) {
	z := newZone()
	view := z.view.Load()
	for i := range 256 {
		for key, value := range member(fmt.Sprintf("worker%d", i), fmt.Sprintf("127.0.%d.%d", 10+i/250, 1+i%250)) {
			serv, _ := decode(key, []byte(value))
			view = view.with(key, serv)
		}
	}
	z.view.Store(view)
	req := new(dns.Msg)
	req.SetQuestion("_tensorflow._tcp.tensorflow.local.", dns.TypeSRV)
	for b.Loop() {
		w := &test.ResponseWriter{TCP: true}
		if _, err := z.ServeDNS(context.Background(), w, req); err != nil {
			b.Fatal(err)
		}
	}
}

// askHeld asks for the membership set with MembersOption: wanted records,
// held at most hold.
func askHeld(z *TFZone, wanted uint32, hold time.Duration) *dns.Msg {
	req := new(dns.Msg)
	req.SetQuestion("_tensorflow._tcp.tensorflow.local.", dns.TypeSRV)
	req.SetEdns0(65000, false)
	data := make([]byte, 8)
	binary.BigEndian.PutUint32(data, wanted)
	binary.BigEndian.PutUint32(data[4:], uint32(hold/time.Millisecond))
	opt := req.IsEdns0()
	opt.Option = append(opt.Option, &dns.EDNS0_LOCAL{Code: MembersOption, Data: data})
	rec := &recorder{}
	z.ServeDNS(context.Background(), rec, req)
	return rec.msg
}

func TestAQuestionIsHeldUntilTheSetIsComplete(t *testing.T) {
	z := newZone()
	fill(t, z, member("ps0", "127.0.9.1"))
	done := make(chan *dns.Msg)
	go func() { done <- askHeld(z, 2, 10*time.Second) }()
	select {
	case m := <-done:
		t.Fatalf("answered with 1 of 2 members: %v", m)
	case <-time.After(50 * time.Millisecond):
	}
	view := z.view.Load()
	for key, value := range member("worker0", "127.0.9.2") {
		serv, _ := decode(key, []byte(value))
		view = view.with(key, serv)
	}
	began := time.Now()
	z.setView(view)
	select {
	case m := <-done:
		if len(m.Answer) != 2 || glue(m) != 2 {
			t.Fatalf("held answer: %d members, %d glue; want 2 each", len(m.Answer), glue(m))
		}
		t.Logf("answered %v after the claim arrived", time.Since(began))
	case <-time.After(time.Second):
		t.Fatal("no answer after the second member arrived")
	}
	// A complete set answers at once; an incomplete one when the hold is up.
	began = time.Now()
	if m := askHeld(z, 2, 10*time.Second); len(m.Answer) != 2 || time.Since(began) > time.Second {
		t.Fatalf("complete set: %d members after %v", len(m.Answer), time.Since(began))
	}
	began = time.Now()
	m := askHeld(z, 3, 100*time.Millisecond)
	if held := time.Since(began); len(m.Answer) != 2 || held < 100*time.Millisecond || held > time.Second {
		t.Fatalf("incomplete set: %d members after %v; want 2 after the 100ms hold", len(m.Answer), held)
	}
	if wanted, hold := requestedMembers(m); wanted != 0 || hold != 0 {
		t.Fatalf("a reply carries no hold: %d, %v", wanted, hold)
	}
}
