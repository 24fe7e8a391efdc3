package tfzone

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/coredns/coredns/plugin/etcd/msg"
)

// entry is one etcd key with its value already decoded.
type entry struct {
	key  string
	serv msg.Service
}

// snapshot is an immutable, key-sorted view of every record under the path.
// Queries read a snapshot without locks; the watch loop replaces it whole.
// wire holds the packed answers built from this snapshot (see handler.go):
// it lives and dies with the snapshot, so it never serves an older state.
type snapshot struct {
	entries   []entry
	wire      sync.Map // wireKey -> *keptAnswer
	keptCount atomic.Int64
	counts    sync.Map // key -> int: records at or below it (held questions ask often)
}

// count is the number of records at or below key, as lookup would find them.
func (s *snapshot) count(key string) int {
	if n, ok := s.counts.Load(key); ok {
		return n.(int)
	}
	found, _ := s.lookup(key, false)
	n := len(found)
	s.counts.Store(key, n)
	return n
}

// decode parses a SkyDNS JSON value as the etcd plugin does (plugin/etcd
// loopNodes): Key is set to the etcd key, a missing priority becomes 10.
func decode(key string, value []byte) (msg.Service, error) {
	var serv msg.Service
	if err := json.Unmarshal(value, &serv); err != nil {
		return msg.Service{}, fmt.Errorf("%s: %v", key, err)
	}
	serv.Key = key
	if serv.Priority == 0 {
		serv.Priority = defaultPriority
	}
	return serv, nil
}

// search returns the index of the first entry whose key is >= key.
func (s *snapshot) search(key string) int {
	return sort.Search(len(s.entries), func(i int) bool { return s.entries[i].key >= key })
}

// with returns a copy of s with key set to serv (inserted or replaced).
func (s *snapshot) with(key string, serv msg.Service) *snapshot {
	i := s.search(key)
	if i < len(s.entries) && s.entries[i].key == key {
		entries := make([]entry, len(s.entries))
		copy(entries, s.entries)
		entries[i].serv = serv
		return &snapshot{entries: entries}
	}
	entries := make([]entry, 0, len(s.entries)+1)
	entries = append(entries, s.entries[:i]...)
	entries = append(entries, entry{key, serv})
	entries = append(entries, s.entries[i:]...)
	return &snapshot{entries: entries}
}

// without returns a copy of s without key (s itself when key is absent).
func (s *snapshot) without(key string) *snapshot {
	i := s.search(key)
	if i == len(s.entries) || s.entries[i].key != key {
		return s
	}
	entries := make([]entry, 0, len(s.entries)-1)
	entries = append(entries, s.entries[:i]...)
	entries = append(entries, s.entries[i+1:]...)
	return &snapshot{entries: entries}
}

// lookup answers a name's etcd key the way the etcd plugin's get does: every
// key below it (a prefix read on key + "/"), or, when there is none, the key
// itself; exact asks for the key itself only. Nothing found is ok == false.
func (s *snapshot) lookup(key string, exact bool) (found []entry, ok bool) {
	if !exact {
		prefix := strings.TrimSuffix(key, "/") + "/"
		for i := s.search(prefix); i < len(s.entries) && strings.HasPrefix(s.entries[i].key, prefix); i++ {
			found = append(found, s.entries[i])
		}
		if len(found) > 0 {
			return found, true
		}
		key = strings.TrimSuffix(key, "/")
	}
	i := s.search(key)
	if i < len(s.entries) && s.entries[i].key == key {
		return s.entries[i : i+1], true
	}
	return nil, false
}
