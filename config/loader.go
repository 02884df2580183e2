package config

import (
	"bytes"
	"hash/maphash"
	"slices"

	"github.com/pelletier/go-toml/v2"

	"github.com/podsock/podsock/service"
)

// Loader loads a config file again and again, as an agent's reloads do, and decodes only
// the [[service]] tables whose text changed since the last config it returned: at 100k
// services, decoding and checking every table again was half of a reload that changed
// one. What it returns is what Load followed by LoadServicesFile would; so are its
// errors, which come from them: a file with any problem, or one it cannot cut into tables
// without parsing it, is loaded by them. Not safe for concurrent use.
type Loader struct {
	seeds [2]maphash.Seed
	// The last config returned: its main file's services and its services file's.
	main, extra *fileMemo
}

// NewLoader returns a Loader that knows no config yet.
func NewLoader() *Loader {
	return &Loader{seeds: [2]maphash.Seed{maphash.MakeSeed(), maphash.MakeSeed()}}
}

// chunkSum identifies a [[service]] table's text. Two seeds make a collision, which would
// serve a service as another text decoded it, a chance of 2^-128 a pair.
type chunkSum [2]uint64

// fileMemo is what a file's [[service]] tables decoded to in the last config returned.
type fileMemo struct {
	path string
	// backendsPerService is the limit the services were checked against.
	backendsPerService int
	services           []service.Service // in file order, sharing the config's array
	sums               []chunkSum        // of each service's text
	bySum              map[chunkSum]int  // position of each text
}

// fileParse is one file cut into its [[service]] tables and the rest, each table known
// from the memo or to be decoded.
type fileParse struct {
	rest     []byte
	chunks   [][]byte
	sums     []chunkSum // of each table's text
	from     []int      // each table's position in the memo; -1: to be decoded
	unknown  int        // tables to be decoded
	memo     *fileMemo
	doc      map[string]any // the rest, once decoded
	services []service.Service
	fresh    []bool // decoded now, not taken from the memo
}

// Load returns the config at path with its services file's services added, as Load and
// LoadServicesFile would.
func (l *Loader) Load(path string) (*Config, error) {
	data, err := readFile(path)
	if err != nil {
		return nil, err
	}
	var mainCut <-chan *fileParse
	if l.main != nil {
		main := l.cut(path, data, l.main)
		if main != nil && main.mostlyKnown() {
			if c, ok := l.loadKnown(path, main); ok {
				return c, nil
			}
		}
		// Cut already: the whole parse need not cut it again.
		mainCut = ready(main)
	}
	return l.loadWhole(path, data, mainCut)
}

// ready is a channel that holds p.
func ready(p *fileParse) <-chan *fileParse {
	out := make(chan *fileParse, 1)
	out <- p
	return out
}

// loadWhole parses the files whole, as Load and LoadServicesFile do, which is as fast as
// decoding table by table when most tables are new (at start, or when every service
// changed) and leaves a fifth less garbage. Unless mainCut has the main file's cut, it cuts them meanwhile, for the next
// load.
func (l *Loader) loadWhole(path string, data []byte, mainCut <-chan *fileParse) (*Config, error) {
	if mainCut == nil {
		mainCut = l.cutAsync(path, data)
	}
	c, err := Parse(path, data)
	if err != nil {
		return nil, err
	}
	nMain := len(c.Services)
	var extraCut <-chan *fileParse
	sf := c.Agent.ServicesFile
	if sf != "" {
		extra, err := readFile(sf)
		if err != nil {
			return nil, err
		}
		extraCut = l.cutAsync(sf, extra)
		if err := c.addServicesFile(sf, extra); err != nil {
			return nil, err
		}
	}
	l.main, l.extra = (<-mainCut).remember(path, c.Services[:nMain], c.Limits), nil
	if extraCut != nil {
		l.extra = (<-extraCut).remember(sf, c.Services[nMain:], c.Limits)
	}
	return c, nil
}

// cutAsync cuts data on another goroutine; nil for a text that cannot be cut.
func (l *Loader) cutAsync(path string, data []byte) <-chan *fileParse {
	out := make(chan *fileParse, 1)
	go func() { out <- l.cut(path, data, nil) }()
	return out
}

// cut cuts a file's text and finds its tables in memo; nil when it cannot be cut.
func (l *Loader) cut(path string, data []byte, memo *fileMemo) *fileParse {
	if memo != nil && memo.path != path {
		memo = nil
	}
	rest, chunks, ok := serviceChunks(bytes.TrimPrefix(data, []byte("\xef\xbb\xbf")))
	if !ok {
		return nil
	}
	p := &fileParse{rest: rest, chunks: chunks, memo: memo}
	if len(chunks) == 0 {
		return p
	}
	p.sums, p.from = make([]chunkSum, len(chunks)), make([]int, len(chunks))
	for i, chunk := range chunks {
		sum := chunkSum{maphash.Bytes(l.seeds[0], chunk), maphash.Bytes(l.seeds[1], chunk)}
		p.sums[i], p.from[i] = sum, -1
		if memo == nil {
			continue
		}
		// Most tables are where they were: the index is for those that moved.
		j, ok := i, i < len(memo.sums) && memo.sums[i] == sum
		if !ok {
			j, ok = memo.bySum[sum]
		}
		if ok {
			p.from[i] = j
		}
	}
	for _, j := range p.from {
		if j < 0 {
			p.unknown++
		}
	}
	return p
}

// mostlyKnown says decoding only the unknown tables beats parsing the file whole.
func (p *fileParse) mostlyKnown() bool { return p.memo != nil && p.unknown*4 <= len(p.chunks) }

// decode decodes the rest and the unknown tables; false on any problem, which the whole
// file's parse is left to report.
func (p *fileParse) decode() bool {
	if err := toml.Unmarshal(p.rest, &p.doc); err != nil {
		return false
	}
	if _, ok := p.doc["service"]; ok {
		return false
	}
	if len(p.chunks) == 0 { // no tables decode to no slice, as Parse has it
		return true
	}
	p.services, p.fresh = make([]service.Service, len(p.chunks)), make([]bool, len(p.chunks))
	d := decoder{c: &Config{}, bad: map[string]bool{}}
	at := keyPath{}.key("service")
	for i, chunk := range p.chunks {
		if j := p.from[i]; j >= 0 {
			p.services[i] = p.memo.services[j]
			continue
		}
		var doc map[string]any
		if err := toml.Unmarshal(chunk, &doc); err != nil {
			return false
		}
		elems, ok := arrayElems(doc["service"])
		if len(doc) != 1 || !ok || len(elems) != 1 {
			return false
		}
		t, ok := elems[0].(map[string]any)
		if !ok {
			return false
		}
		p.services[i], p.fresh[i] = d.service(at, i, t), true
	}
	return len(d.problems) == 0
}

// loadKnown loads path through the memos, main being its cut; false when the file or
// its services file has a problem or cannot be followed, for loadWhole to parse.
func (l *Loader) loadKnown(path string, main *fileParse) (*Config, bool) {
	if !main.decode() {
		return nil, false
	}
	c := Default()
	c.Path = path
	d := decoder{c: c, bad: map[string]bool{}}
	d.document(main.doc)
	c.Services = main.services
	if len(d.problems) > 0 || len(c.checkSettings()) > 0 {
		return nil, false
	}
	parses := []*fileParse{main}
	if sf := c.Agent.ServicesFile; sf != "" {
		data, err := readFile(sf)
		if err != nil {
			return nil, false
		}
		extra := l.cut(sf, data, l.extra)
		// A services file holds only [[service]] tables.
		if extra == nil || !extra.mostlyKnown() || !extra.decode() || len(extra.doc) > 0 {
			return nil, false
		}
		parses = append(parses, extra)
		c.Services = slices.Concat(main.services, extra.services)
		c.servicesFileRead = true
	}
	// Recounted over both files: checkSettings saw only the main file's.
	if len(c.Services) > c.Limits.Services {
		return nil, false
	}
	known := knownServices{unique: true}
	offsets := make([]int, len(parses))
	for i, p := range parses {
		if i > 0 {
			offsets[i] = offsets[i-1] + len(parses[i-1].services)
		}
		known.unique = known.unique && p.sameFrontends()
	}
	known.valid = func(i int) bool {
		for j := len(parses) - 1; j >= 0; j-- {
			if i >= offsets[j] {
				p := parses[j]
				return p.memo.backendsPerService == c.Limits.BackendsPerService && !p.fresh[i-offsets[j]]
			}
		}
		return false
	}
	var ps problems
	c.checkServices(&ps, nil, known)
	if len(ps) > 0 {
		return nil, false
	}
	l.main, l.extra = main.remember(path, c.Services[:len(main.services)], c.Limits), nil
	if len(parses) > 1 {
		l.extra = parses[1].remember(c.Agent.ServicesFile, c.Services[len(main.services):], c.Limits)
	}
	return c, true
}

// sameFrontends says each service has the name and frontend that the one at its position
// had in the memo's config, where no two shared either: neither do they now.
func (p *fileParse) sameFrontends() bool {
	m := p.memo
	if len(m.services) != len(p.services) {
		return false
	}
	for i := range p.services {
		if !p.services[i].SameFrontend(&m.services[i]) {
			return false
		}
	}
	return true
}

// remember makes the memo of a cut whose config is returned, its services as that config
// holds them; nil when they are not the cut's tables (a service = [...] array). Where
// every table kept its place, the old memo's index is updated rather than built again.
func (p *fileParse) remember(path string, services []service.Service, limits Limits) *fileMemo {
	if p == nil || len(p.sums) != len(services) {
		return nil
	}
	m := &fileMemo{path: path, backendsPerService: limits.BackendsPerService, services: services, sums: p.sums}
	if old := p.memo; old != nil && len(old.sums) == len(p.sums) {
		m.bySum = old.bySum
		for i, sum := range p.sums {
			if prev := old.sums[i]; prev != sum {
				if m.bySum[prev] == i {
					delete(m.bySum, prev)
				}
				m.bySum[sum] = i
			}
		}
		return m
	}
	m.bySum = make(map[chunkSum]int, len(p.sums))
	for i, sum := range p.sums {
		m.bySum[sum] = i
	}
	return m
}

// serviceChunks cuts a config's text into its [[service]] tables and the rest, without
// parsing it: each table runs from its [[service]] header to the next header that is not
// one of its own subtables ([service.x], [[service.x]]), and the rest keeps the other
// headers, in order, with their keys. ok is false for a text it cannot cut with certainty
// (a quoted header, [service], a subtable of no service, a bracket or string left open).
func serviceChunks(src []byte) (rest []byte, chunks [][]byte, ok bool) {
	restStart, chunkStart := 0, -1
	depth := 0 // brackets and braces open in a value
	lineStart := true
	// Each table is one slice header: growing the list from empty allocated five times its
	// final size (2.4 MB at 100k tables).
	chunks = make([][]byte, 0, bytes.Count(src, []byte("[[service]]")))
	for pos := 0; pos < len(src); {
		if lineStart && depth == 0 {
			lineStart = false
			j := pos
			for j < len(src) && (src[j] == ' ' || src[j] == '\t') {
				j++
			}
			if j < len(src) && src[j] == '[' {
				kind, end := headerAt(src, j)
				switch kind {
				case headerService:
					if chunkStart >= 0 {
						chunks = append(chunks, src[chunkStart:pos])
					} else {
						rest = append(rest, src[restStart:pos]...)
					}
					chunkStart = pos
				case headerServiceSub:
					if chunkStart < 0 {
						return nil, nil, false
					}
				case headerOther:
					if chunkStart >= 0 {
						chunks = append(chunks, src[chunkStart:pos])
						chunkStart, restStart = -1, pos
					}
				default:
					return nil, nil, false
				}
				pos = end
				continue
			}
		}
		// Most bytes are none of those it looks at: step over them in a loop of their own.
		for pos < len(src) && !tomlSpecial[src[pos]] {
			pos++
		}
		if pos == len(src) {
			break
		}
		switch src[pos] {
		case '\n':
			lineStart = depth == 0
			pos++
		case '#':
			for pos < len(src) && src[pos] != '\n' {
				pos++
			}
		case '"', '\'':
			if pos, ok = skipTOMLString(src, pos); !ok {
				return nil, nil, false
			}
		case '[', '{':
			depth++
			pos++
		case ']', '}':
			if depth--; depth < 0 {
				return nil, nil, false
			}
			pos++
		default:
			pos++
		}
	}
	if depth != 0 {
		return nil, nil, false
	}
	if chunkStart >= 0 {
		chunks = append(chunks, src[chunkStart:])
	} else {
		rest = append(rest, src[restStart:]...)
	}
	return rest, chunks, true
}

// tomlSpecial are the bytes serviceChunks looks at; it steps over the others.
var tomlSpecial = func() (t [256]bool) {
	for _, c := range []byte("\n#\"'[]{}") {
		t[c] = true
	}
	return t
}()

type headerKind int

const (
	headerBad        headerKind = iota
	headerService               // [[service]]
	headerServiceSub            // [service.x] or [[service.x]]
	headerOther
)

// headerAt reads the table header at src[pos] ('['): its kind, and where it ends.
func headerAt(src []byte, pos int) (headerKind, int) {
	pos++
	array := pos < len(src) && src[pos] == '['
	if array {
		pos++
	}
	var first []byte // the first key; a header's keys are never kept, there are 100k
	n := 0
	for {
		for pos < len(src) && (src[pos] == ' ' || src[pos] == '\t') {
			pos++
		}
		start := pos
		for pos < len(src) && isBareKeyByte(src[pos]) {
			pos++
		}
		if pos == start {
			return headerBad, pos // a quoted key, or none
		}
		if n++; n == 1 {
			first = src[start:pos]
		}
		for pos < len(src) && (src[pos] == ' ' || src[pos] == '\t') {
			pos++
		}
		if pos < len(src) && src[pos] == '.' {
			pos++
			continue
		}
		break
	}
	closing := "]"
	if array {
		closing = "]]"
	}
	if !bytes.HasPrefix(src[pos:], []byte(closing)) {
		return headerBad, pos
	}
	pos += len(closing)
	switch {
	case string(first) != "service":
		return headerOther, pos
	case n > 1:
		return headerServiceSub, pos
	case array:
		return headerService, pos
	}
	return headerBad, pos
}

// skipTOMLString returns where the string at src[pos] ends: basic, literal or multi-line.
func skipTOMLString(src []byte, pos int) (int, bool) {
	q := src[pos]
	if pos+2 < len(src) && src[pos+1] == q && src[pos+2] == q {
		pos += 3
		for pos < len(src) {
			switch {
			case src[pos] == '\\' && q == '"':
				pos += 2
			case bytes.HasPrefix(src[pos:], []byte{q, q, q}):
				pos += 3
				// Up to two more quotes are content right before the delimiter.
				for i := 0; i < 2 && pos < len(src) && src[pos] == q; i++ {
					pos++
				}
				return pos, true
			default:
				pos++
			}
		}
		return pos, false
	}
	escapes := q == '"'
	for pos++; pos < len(src); pos++ {
		c := src[pos]
		if c > '\\' || (c != q && c != '\\' && c != '\n') {
			continue
		}
		switch {
		case c == q:
			return pos + 1, true
		case c == '\n':
			return pos, false
		case escapes: // a backslash
			pos++
		}
	}
	return pos, false
}
