package wire

import (
	"fmt"

	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/protoadapt"
)

// Codec is gRPC's protobuf codec with fast paths for Checks: a *Request is
// decoded by Request.Decode, and a *Frozen (a response that OK.Encode or
// Denied.Encode wrote) is sent as its bytes. Everything else, such as
// grpc.health.v1, goes through the generic protobuf code as usual.
//
// Install it with grpc.ForceServerCodecV2 on the server that serves Checks.
type Codec struct{}

var _ encoding.CodecV2 = Codec{}

// Name is "proto": the content-subtype gRPC clients such as Envoy send.
func (Codec) Name() string { return "proto" }

// Marshal encodes v.
func (Codec) Marshal(v any) (mem.BufferSlice, error) {
	if f, ok := v.(*Frozen); ok {
		return f.out[:], nil
	}
	msg := messageOf(v)
	if msg == nil {
		return nil, fmt.Errorf("wire: cannot marshal %T", v)
	}
	b, err := proto.Marshal(msg)
	if err != nil {
		return nil, err
	}
	return mem.BufferSlice{mem.SliceBuffer(b)}, nil
}

// Unmarshal decodes data into v.
func (Codec) Unmarshal(data mem.BufferSlice, v any) error {
	buf := data.MaterializeToBuffer(mem.DefaultBufferPool())
	defer buf.Free()
	if r, ok := v.(*Request); ok {
		// gRPC answers a codec error with an INTERNAL status of its own;
		// keygate answers every Check with a decision instead.
		if err := r.Decode(buf.ReadOnlyData()); err != nil {
			*r = Request{Malformed: true}
		}
		return nil
	}
	msg := messageOf(v)
	if msg == nil {
		return fmt.Errorf("wire: cannot unmarshal into %T", v)
	}
	return proto.Unmarshal(buf.ReadOnlyData(), msg)
}

func messageOf(v any) proto.Message {
	switch v := v.(type) {
	case protoadapt.MessageV2:
		return v
	case protoadapt.MessageV1:
		return protoadapt.MessageV2Of(v)
	}
	return nil
}

// Frozen is a response already encoded (OK.Encode, Denied.Encode), sent
// as those bytes: once for a single Check, or on every Check for a
// response that never changes, such as keygate's fixed denials. Nothing
// changes its bytes afterwards, so any number of sends may share them.
//
// Sending one allocates nothing: Marshal returns a BufferSlice held in the
// Frozen, whose one Buffer is a pointer to its bytes (a SliceBuffer as an
// interface would be boxed anew on every send). gRPC only reads a
// BufferSlice it is given to send, and Free is a no-op on a SliceBuffer, so
// sends of a fixed denial share it.
type Frozen struct {
	b   mem.SliceBuffer
	out [1]mem.Buffer // &b
}

func frozen(b []byte) *Frozen {
	f := &Frozen{b: b}
	f.out[0] = &f.b
	return f
}
