package admin

import (
	"errors"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/rconn"
)

// TestToStatus: each store error reaches the CLI as the gRPC code that
// tells the operator what to do, wrapped or not.
func TestToStatus(t *testing.T) {
	tests := []struct {
		err  error
		want codes.Code
	}{
		{keystore.ErrAccountNotFound, codes.NotFound},
		{fmt.Errorf("key k: %w", keystore.ErrKeyNotFound), codes.NotFound},
		{keystore.ErrAccountExists, codes.AlreadyExists},
		{fmt.Errorf("%w: bad tier", keystore.ErrInvalid), codes.InvalidArgument},
		{keystore.ErrKeyInactive, codes.FailedPrecondition},
		{fmt.Errorf("credit acme: %w", rconn.ErrDataLost), codes.FailedPrecondition},
		{fmt.Errorf("credit acme: %w", rconn.ErrUnavailable), codes.Unavailable},
		{errors.New("disk on fire"), codes.Internal},
	}
	for _, tt := range tests {
		st, _ := status.FromError(toStatus(tt.err))
		if st.Code() != tt.want || st.Message() != tt.err.Error() {
			t.Errorf("toStatus(%v) = %v %q, want %v with the same message", tt.err, st.Code(), st.Message(), tt.want)
		}
	}
}
