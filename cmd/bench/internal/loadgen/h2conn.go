package loadgen

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"strconv"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// checkPath is the gRPC method every call goes to.
const checkPath = "/envoy.service.auth.v3.Authorization/Check"

// Errors of an H2Conn.
var (
	ErrConnClosed = errors.New("connection closed")
	ErrTooLarge   = errors.New("request larger than the server's stream window")
	// ErrTimeout is a call the server gave up on at its grpc-timeout: what
	// Envoy turns into a denial (or an allow, with failure_mode_allow).
	ErrTimeout     = errors.New("deadline exceeded")
	errNoSettings  = errors.New("server sent no SETTINGS")
	errRSTStream   = errors.New("stream reset by the server")
	errBadResponse = errors.New("malformed gRPC response")
)

// H2Conn is a minimal gRPC client over one HTTP/2 connection: unary calls of
// already-encoded messages, many in flight at once, as Envoy's own gRPC
// client makes them. It exists because grpc-go's client costs about twice
// as much CPU per call: a generator built on it, given one core, runs out of
// CPU at about the rate it is meant to measure. Here a call is a HEADERS
// frame and one DATA frame, written by one goroutine that flushes only when
// no other call is waiting, and responses are read by one goroutine that
// decodes nothing but the gRPC status and the bytes.
//
// It implements what a unary call over a grpc-go server needs: connection
// and stream flow control, MAX_CONCURRENT_STREAMS, MAX_FRAME_SIZE, SETTINGS
// and PING acknowledgements. It does not retry, and treats GOAWAY as the end.
type H2Conn struct {
	nc      net.Conn
	fields  []hpack.HeaderField // the request headers of every call
	timeout bool                // calls carry a grpc-timeout
	wake    chan struct{}       // tells the writer that calls are queued

	wmu     sync.Mutex // guards bw, fr's write side, henc, hbuf and scratch
	bw      *bufio.Writer
	fr      *http2.Framer
	henc    *hpack.Encoder // writes to hbuf
	hbuf    bytes.Buffer
	scratch []byte // the first DATA payload: prefix and message

	mu           sync.Mutex // guards the fields below
	cond         *sync.Cond // signalled when sendWindow, active, maxStreams or err change
	queued       []*Call    // calls waiting for the writer
	sendWindow   int64      // connection-level send window
	streamWindow int64      // the server's initial stream window
	maxStreams   uint32
	maxFrame     int
	active       uint32
	nextID       uint32
	pending      map[uint32]*Call
	err          error // set once: the connection is unusable
	recvUnacked  uint32

	done chan struct{} // closed when the reader returns
}

// A Call is one unary call, reusable once Done has been received from.
type Call struct {
	Req    []byte        // gRPC message (without the 5-byte prefix)
	Resp   []byte        // the response message, once done; valid until the next Do
	Status int           // grpc-status
	Err    error         // transport failure
	Done   chan struct{} // receives once per call

	raw []byte // response DATA as received, prefix included
	id  uint32
}

// NewCall returns a Call ready for H2Conn.Do.
func NewCall() *Call { return &Call{Done: make(chan struct{}, 1)} }

// receive windows we advertise: large, so that the server never waits on us.
const (
	recvStreamWindow = 1 << 22
	recvConnWindow   = 1 << 26
)

// DialH2 connects to addr (host:port, plaintext) and performs the HTTP/2
// handshake, returning once the server's SETTINGS have been received. Every
// call carries timeout as its grpc-timeout (0: none); Envoy's ext_authz
// filter sends its own timeout, 200 ms by default, which also makes a
// grpc-go server arm a deadline per call.
func DialH2(ctx context.Context, addr string, timeout time.Duration) (*H2Conn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	c := newH2Conn(nc, addr, timeout)
	if err := c.handshake(ctx); err != nil {
		nc.Close()
		return nil, err
	}
	return c, nil
}

func newH2Conn(nc net.Conn, authority string, timeout time.Duration) *H2Conn {
	c := &H2Conn{
		nc:           nc,
		wake:         make(chan struct{}, 1),
		timeout:      timeout > 0,
		bw:           bufio.NewWriterSize(nc, 64<<10),
		sendWindow:   65535,
		streamWindow: 65535,
		maxStreams:   math.MaxUint32,
		maxFrame:     16384,
		nextID:       1,
		pending:      map[uint32]*Call{},
		done:         make(chan struct{}),
	}
	c.cond = sync.NewCond(&c.mu)
	c.fr = http2.NewFramer(c.bw, bufio.NewReaderSize(nc, 64<<10))
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.MaxHeaderListSize = 1 << 20
	// Every call sends the same headers, encoded with HPACK's dynamic table
	// as Envoy's HTTP/2 codec does: after the first call each is a one-byte
	// index, and the server's decoder allocates nothing for them.
	c.henc = hpack.NewEncoder(&c.hbuf)
	c.fields = []hpack.HeaderField{
		{Name: ":method", Value: "POST"},
		{Name: ":scheme", Value: "http"},
		{Name: ":path", Value: checkPath},
		{Name: ":authority", Value: authority},
		{Name: "content-type", Value: "application/grpc"},
		{Name: "te", Value: "trailers"},
	}
	if timeout > 0 {
		c.fields = append(c.fields, hpack.HeaderField{Name: "grpc-timeout", Value: strconv.FormatInt(timeout.Milliseconds(), 10) + "m"})
	}
	return c
}

func (c *H2Conn) handshake(ctx context.Context) error {
	if dl, ok := ctx.Deadline(); ok {
		c.nc.SetDeadline(dl) //nolint:errcheck // best effort: the read below fails anyway
	} else {
		c.nc.SetDeadline(time.Now().Add(10 * time.Second)) //nolint:errcheck
	}
	if _, err := io.WriteString(c.bw, http2.ClientPreface); err != nil {
		return err
	}
	if err := c.fr.WriteSettings(
		http2.Setting{ID: http2.SettingEnablePush, Val: 0},
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: recvStreamWindow},
		http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: 1 << 20},
	); err != nil {
		return err
	}
	if err := c.fr.WriteWindowUpdate(0, recvConnWindow-65535); err != nil {
		return err
	}
	if err := c.bw.Flush(); err != nil {
		return err
	}
	f, err := c.fr.ReadFrame()
	if err != nil {
		return fmt.Errorf("http2 handshake: %w", err)
	}
	sf, ok := f.(*http2.SettingsFrame)
	if !ok || sf.IsAck() {
		return errNoSettings
	}
	if err := c.applySettings(sf); err != nil {
		return err
	}
	c.nc.SetDeadline(time.Time{}) //nolint:errcheck
	go c.readLoop()
	go c.writeLoop()
	return nil
}

// applySettings takes the server's settings and acknowledges them.
func (c *H2Conn) applySettings(sf *http2.SettingsFrame) error {
	c.mu.Lock()
	err := sf.ForeachSetting(func(s http2.Setting) error {
		switch s.ID {
		case http2.SettingMaxConcurrentStreams:
			c.maxStreams = s.Val
		case http2.SettingInitialWindowSize:
			c.streamWindow = int64(s.Val)
		case http2.SettingMaxFrameSize:
			c.maxFrame = int(s.Val)
		}
		return nil
	})
	c.cond.Broadcast()
	c.mu.Unlock()
	if err != nil {
		return err
	}
	return c.writeControl(func() error { return c.fr.WriteSettingsAck() })
}

func (c *H2Conn) writeControl(write func() error) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := write(); err != nil {
		return err
	}
	return c.bw.Flush()
}

// Do starts call; its result arrives on call.Done. Do does not block.
func (c *H2Conn) Do(call *Call) {
	call.Resp, call.Status, call.Err = nil, 0, nil
	c.mu.Lock()
	if err := c.err; err != nil {
		c.mu.Unlock()
		call.Err = err
		call.Done <- struct{}{}
		return
	}
	c.queued = append(c.queued, call)
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default: // the writer is already awake
	}
}

// Close closes the connection; calls in flight fail.
func (c *H2Conn) Close() error {
	err := c.nc.Close()
	<-c.done
	return err
}

// writeLoop writes queued calls, flushing once no more are queued (or when it
// must wait for a window), so that calls made together share a syscall.
func (c *H2Conn) writeLoop() {
	var batch []*Call
	for {
		select {
		case <-c.wake:
		case <-c.done:
			return // fail has answered every call
		}
		for {
			c.mu.Lock()
			batch = append(batch[:0], c.queued...)
			clear(c.queued)
			c.queued = c.queued[:0]
			c.mu.Unlock()
			if len(batch) == 0 {
				break
			}
			for i, call := range batch {
				if err := c.write(call); err != nil {
					c.fail(err)
					c.answer(batch[i:], err)
					c.nc.Close()
					return
				}
			}
		}
		c.wmu.Lock()
		err := c.bw.Flush()
		c.wmu.Unlock()
		if err != nil {
			c.fail(err)
			c.nc.Close()
			return
		}
	}
}

// answer fails calls with err.
func (c *H2Conn) answer(calls []*Call, err error) {
	for _, call := range calls {
		call.Err = err
		call.Done <- struct{}{}
	}
}

func (c *H2Conn) write(call *Call) error {
	need := int64(len(call.Req) + 5)
	c.mu.Lock()
	if need > c.streamWindow {
		c.mu.Unlock()
		call.Err = ErrTooLarge
		call.Done <- struct{}{}
		return nil
	}
	for c.err == nil && (c.sendWindow < need || c.active >= c.maxStreams) {
		// Flush what is buffered first: the server cannot return window for
		// data it has not received.
		c.mu.Unlock()
		c.wmu.Lock()
		err := c.bw.Flush()
		c.wmu.Unlock()
		if err != nil {
			return err
		}
		c.mu.Lock()
		if c.err == nil && (c.sendWindow < need || c.active >= c.maxStreams) {
			c.cond.Wait()
		}
	}
	if c.err != nil {
		c.mu.Unlock()
		return c.err // answered by the caller
	}
	id := c.nextID
	c.nextID += 2
	c.sendWindow -= need
	c.active++
	call.id = id
	call.raw = call.raw[:0]
	c.pending[id] = call
	maxFrame := c.maxFrame
	c.mu.Unlock()

	c.wmu.Lock()
	defer c.wmu.Unlock()
	// Encoded here, under wmu, so that the encoder's table follows the
	// order in which the server reads the blocks.
	c.hbuf.Reset()
	for _, f := range c.fields {
		c.henc.WriteField(f) //nolint:errcheck // writes to a bytes.Buffer cannot fail
	}
	if err := c.fr.WriteHeaders(http2.HeadersFrameParam{
		StreamID: id, BlockFragment: c.hbuf.Bytes(), EndHeaders: true,
	}); err != nil {
		return err
	}
	// The 5-byte gRPC prefix and the message go out as one payload,
	// split at the server's frame size.
	msg := call.Req
	first := min(maxFrame-5, len(msg))
	c.scratch = append(c.scratch[:0], 0, 0, 0, 0, 0)
	binary.BigEndian.PutUint32(c.scratch[1:], uint32(len(msg)))
	c.scratch = append(c.scratch, msg[:first]...)
	msg = msg[first:]
	if err := c.fr.WriteData(id, len(msg) == 0, c.scratch); err != nil {
		return err
	}
	for len(msg) > 0 {
		n := min(maxFrame, len(msg))
		if err := c.fr.WriteData(id, n == len(msg), msg[:n]); err != nil {
			return err
		}
		msg = msg[n:]
	}
	return nil
}

// fail marks the connection dead with err (the first error wins) and
// answers every pending and queued call.
func (c *H2Conn) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	err = c.err
	calls := c.queued
	c.queued = nil
	for _, call := range c.pending {
		calls = append(calls, call)
	}
	c.pending = map[uint32]*Call{}
	c.cond.Broadcast()
	c.mu.Unlock()
	c.answer(calls, err)
}

func (c *H2Conn) readLoop() {
	defer close(c.done)
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
				err = ErrConnClosed
			}
			c.fail(err)
			return
		}
		if err := c.handle(f); err != nil {
			c.fail(err)
			c.nc.Close()
			return
		}
	}
}

func (c *H2Conn) handle(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.SettingsFrame:
		if f.IsAck() {
			return nil
		}
		return c.applySettings(f)
	case *http2.PingFrame:
		if f.IsAck() {
			return nil
		}
		return c.writeControl(func() error { return c.fr.WritePing(true, f.Data) })
	case *http2.WindowUpdateFrame:
		if f.StreamID == 0 {
			c.mu.Lock()
			c.sendWindow += int64(f.Increment)
			c.cond.Broadcast()
			c.mu.Unlock()
		}
		return nil
	case *http2.DataFrame:
		return c.onData(f)
	case *http2.MetaHeadersFrame:
		if f.StreamEnded() {
			return c.finish(f.StreamID, f.PseudoValue("status"), f.Fields)
		}
		return nil // response headers: grpc-status comes in the trailers
	case *http2.RSTStreamFrame:
		call := c.take(f.StreamID)
		if call != nil {
			call.Err = fmt.Errorf("%w: %v", errRSTStream, f.ErrCode)
			if f.ErrCode == http2.ErrCodeCancel && c.timeout {
				// grpc-go resets a stream whose deadline passes.
				call.Err = fmt.Errorf("%w (%w)", ErrTimeout, call.Err)
			}
			call.Done <- struct{}{}
		}
		return nil
	case *http2.GoAwayFrame:
		return fmt.Errorf("GOAWAY from the server: %v %q", f.ErrCode, f.DebugData())
	}
	return nil
}

func (c *H2Conn) onData(f *http2.DataFrame) error {
	n := f.Header().Length // padding counts against flow control too
	c.mu.Lock()
	call := c.pending[f.StreamID]
	if call != nil {
		call.raw = append(call.raw, f.Data()...)
	}
	c.recvUnacked += n
	update := uint32(0)
	if c.recvUnacked >= recvConnWindow/4 {
		update, c.recvUnacked = c.recvUnacked, 0
	}
	c.mu.Unlock()
	if update > 0 {
		if err := c.writeControl(func() error { return c.fr.WriteWindowUpdate(0, update) }); err != nil {
			return err
		}
	}
	if f.StreamEnded() {
		return c.finish(f.StreamID, "", nil)
	}
	return nil
}

// take removes the call of stream id from the pending set.
func (c *H2Conn) take(id uint32) *Call {
	c.mu.Lock()
	defer c.mu.Unlock()
	call := c.pending[id]
	if call != nil {
		delete(c.pending, id)
		c.active--
		c.cond.Broadcast()
	}
	return call
}

func (c *H2Conn) finish(id uint32, httpStatus string, trailers []hpack.HeaderField) error {
	call := c.take(id)
	if call == nil {
		return nil // a stream we gave up on
	}
	call.Status = -1
	for _, hf := range trailers {
		if hf.Name == "grpc-status" {
			s, err := strconv.Atoi(hf.Value)
			if err == nil {
				call.Status = s
			}
		}
	}
	switch {
	case httpStatus != "" && httpStatus != "200":
		call.Err = fmt.Errorf("%w: HTTP status %s", errBadResponse, httpStatus)
	case call.Status < 0:
		call.Err = fmt.Errorf("%w: no grpc-status", errBadResponse)
	case len(call.raw) > 0:
		if len(call.raw) < 5 || call.raw[0] != 0 || int(binary.BigEndian.Uint32(call.raw[1:5])) != len(call.raw)-5 {
			call.Err = fmt.Errorf("%w: bad message framing", errBadResponse)
		} else {
			call.Resp = call.raw[5:] // raw is reused only by the next call
		}
	}
	call.Done <- struct{}{}
	return nil
}
