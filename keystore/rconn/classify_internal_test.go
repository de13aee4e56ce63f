package rconn

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"testing"

	"github.com/redis/go-redis/v9"
)

// reply is an error reply from Redis, as the client builds them.
type reply string

func (r reply) Error() string { return string(r) }
func (reply) RedisError()     {}

func TestClassify(t *testing.T) {
	done, cancel := context.WithCancel(context.Background())
	cancel()
	live := context.Background()
	for _, tt := range []struct {
		name    string
		parent  context.Context
		err     error
		expired bool
		want    outcome
	}{
		{"nil", live, nil, false, answered},
		{"redis.Nil", live, redis.Nil, false, answered},
		{"wrapped redis.Nil", live, fmt.Errorf("get: %w", redis.Nil), false, answered},
		{"WRONGTYPE", live, reply("WRONGTYPE Operation against a key holding the wrong kind of value"), false, answered},
		{"script error", live, reply("NOFUNDS balance"), false, answered},
		{"BUSYKEY is an answer", live, reply("BUSYKEY Target key name already exists."), false, answered},
		{"own error", live, errors.New("lease refused"), false, answered},
		{"LOADING", live, reply("LOADING Redis is loading the dataset in memory"), false, failed},
		{"READONLY", live, reply("READONLY You can't write against a read only replica."), false, failed},
		{"BUSY", live, reply("BUSY Redis is busy running a script."), false, failed},
		{"WRONGPASS wrapped", live, fmt.Errorf("failed to authenticate: %w", reply("WRONGPASS invalid username-password pair")), false, failed},
		{"max clients", live, reply("ERR max number of clients reached"), false, failed},
		{"refused", live, &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}, false, failed},
		{"reset", live, &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)}, false, failed},
		{"EOF", live, io.EOF, false, failed},
		{"client closed", live, redis.ErrClosed, false, failed},
		{"pool exhausted", live, redis.ErrPoolExhausted, false, failed},
		{"read timeout", live, &net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded}, false, timedOut},
		{"deadline error", live, os.ErrDeadlineExceeded, false, timedOut},
		{"context deadline", live, context.DeadlineExceeded, false, timedOut},
		{"pool timeout", live, redis.ErrPoolTimeout, false, timedOut},
		{"own error after the deadline", live, errors.New("no reply"), true, timedOut},
		{"caller cancelled", done, context.Canceled, false, abandoned},
		{"cancelled, parent live", live, context.Canceled, false, abandoned},
		{"caller gone, connection error", done, io.EOF, false, abandoned},
		{"caller gone, Redis answered", done, reply("WRONGTYPE x"), false, answered},
		{"caller gone, LOADING", done, reply("LOADING x"), false, failed},
	} {
		if got := classify(tt.parent, tt.err, tt.expired); got != tt.want {
			t.Errorf("%s: classify(%v) = %d, want %d", tt.name, tt.err, got, tt.want)
		}
	}
}
