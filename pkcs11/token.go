//go:build cgo

package pkcs11

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"

	p11 "github.com/miekg/pkcs11"

	"github.com/kleidi-kms/kleidi"
)

// maxSessions bounds the sessions a provider opens on its token, hence its calls in flight.
const maxSessions = 4

// module is a PKCS#11 library loaded in the process. C_Initialize and C_Finalize act on the whole process, so
// every provider of the process that names the same library shares one module.
type module struct {
	path string
	ctx  *p11.Ctx
	// mu is read-locked during every call into the library and write-locked to initialise or finalise it, so
	// the library is never finalised under a call.
	mu    sync.RWMutex
	ready bool   // C_Initialize succeeded and no C_Finalize came since
	gen   uint64 // changes at every initialisation and finalisation: older sessions and handles are gone
	users int    // guarded by modules
}

// modules are the loaded libraries by path.
var modules = struct {
	sync.Mutex
	m map[string]*module
}{m: map[string]*module{}}

// loadModule loads the library at path, or shares the one already loaded.
func loadModule(path string) (*module, error) {
	modules.Lock()
	defer modules.Unlock()
	if m := modules.m[path]; m != nil {
		m.users++
		return m, nil
	}
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("%w: PKCS#11 module: %w", kleidi.ErrUnavailable, err)
	}
	ctx := p11.New(path)
	if ctx == nil {
		return nil, fmt.Errorf("%w: PKCS#11 module %s cannot be loaded: not a PKCS#11 library, or one of its dependencies is missing", kleidi.ErrUnavailable, path)
	}
	m := &module{path: path, ctx: ctx, users: 1}
	modules.m[path] = m
	return m, nil
}

// release drops a provider's use of m; the last one finalises and unloads the library.
func (m *module) release() {
	modules.Lock()
	defer modules.Unlock()
	if m.users--; m.users > 0 {
		return
	}
	delete(modules.m, m.path)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ready {
		m.ctx.Finalize()
		m.ready = false
	}
	m.ctx.Destroy()
}

// begin read-locks m, initialising the library first if it is not, and returns its generation. The caller
// read-unlocks m.mu when its calls are done.
func (m *module) begin() (uint64, error) {
	for {
		m.mu.RLock()
		if m.ready {
			return m.gen, nil
		}
		m.mu.RUnlock()
		m.mu.Lock()
		if !m.ready {
			if err := m.ctx.Initialize(); err != nil && !hasCode(err, p11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
				m.mu.Unlock()
				return 0, fmt.Errorf("%w: C_Initialize: %w", kleidi.ErrUnavailable, err)
			}
			m.ready = true
			m.gen++
		}
		m.mu.Unlock()
	}
}

// reset finalises the library if it is still at generation gen, so that the next call initialises it again: the
// way to find a token that went away and came back, or a restarted daemon.
func (m *module) reset(gen uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.ready || m.gen != gen {
		return
	}
	m.ctx.Finalize()
	m.ready = false
	m.gen++
}

// token is a provider's connection to its token: the slot, the logged-in sessions and the key handles, valid
// for one generation of the module.
type token struct {
	cfg  Config
	mod  *module
	sem  chan struct{} // one slot per session in use
	done chan struct{} // closed by close

	mu     sync.Mutex // guards the fields below
	pin    []byte
	conn   *conn
	pinErr error // the token refused the PIN: never tried again
	closed bool
}

// conn is what a login on the token gives, for one generation of the module.
type conn struct {
	gen      uint64
	slot     uint
	aes, mac p11.ObjectHandle
	idle     []p11.SessionHandle
}

func openToken(ctx context.Context, cfg Config, pin []byte) (*token, error) {
	mod, err := loadModule(cfg.Module)
	if err != nil {
		return nil, fmt.Errorf("pkcs11: %s: %w", cfg, err)
	}
	t := &token{cfg: cfg, mod: mod, sem: make(chan struct{}, maxSessions), done: make(chan struct{}), pin: append([]byte(nil), pin...)}
	// A token made after the library was initialised (by another provider of the process) appears only once the
	// library is initialised again, which the first failure does: so try twice.
	err = t.health(ctx)
	if err != nil && !errors.Is(err, ErrPIN) && ctx.Err() == nil {
		err = t.health(ctx)
	}
	if err != nil {
		t.close()
		return nil, fmt.Errorf("pkcs11: %s: %w", cfg, err)
	}
	return t, nil
}

// errClosed is returned by calls that meet a closed token.
var errClosed = fmt.Errorf("%w", kleidi.ErrClosed)

// do runs f on a logged-in session, connecting first when needed. Errors of f that show the token, the session
// or the library gone (see lost) drop the connection and finalise the library, so that the next call starts
// afresh; they and every other failure of the token wrap [kleidi.ErrUnavailable], except errors f already
// classified as [kleidi.ErrUnwrap]. The context is checked before the call: a PKCS#11 call cannot be interrupted.
func (t *token) do(ctx context.Context, op string, f func(c *p11.Ctx, s p11.SessionHandle, k *conn) error) (err error) {
	if err := ctx.Err(); err != nil {
		return err
	}
	select {
	case t.sem <- struct{}{}:
	case <-t.done:
		return errClosed
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-t.sem }()
	select {
	case <-t.done:
		return errClosed
	default:
	}
	gen, err := t.mod.begin()
	if err != nil {
		return err
	}
	broken := false
	func() {
		defer t.mod.mu.RUnlock()
		defer func() {
			if r := recover(); r != nil {
				err, broken = fmt.Errorf("%w: %s: the PKCS#11 library panicked", kleidi.ErrUnavailable, op), true
			}
		}()
		k, s, lostConn, serr := t.session(gen)
		if serr != nil {
			err, broken = serr, lostConn
			return
		}
		ferr := f(t.mod.ctx, s, k)
		switch {
		case ferr == nil:
			t.put(k, s)
		case errors.Is(ferr, kleidi.ErrUnwrap):
			err = ferr
			t.put(k, s)
		case lost(ferr):
			t.mod.ctx.CloseSession(s)
			err, broken = fmt.Errorf("%w: %s: %w", kleidi.ErrUnavailable, op, ferr), true
		default:
			t.put(k, s)
			err = fmt.Errorf("%w: %s: %w", kleidi.ErrUnavailable, op, ferr)
		}
	}()
	if broken {
		t.drop(gen)
		t.mod.reset(gen)
	}
	return err
}

// session returns the connection of generation gen and a logged-in session of it, connecting first if there is
// none. lostConn reports an error that shows the token or the library gone.
func (t *token) session(gen uint64) (k *conn, s p11.SessionHandle, lostConn bool, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case t.closed:
		return nil, 0, false, errClosed
	case t.pinErr != nil:
		return nil, 0, false, t.pinErr
	}
	if t.conn != nil && t.conn.gen != gen {
		t.conn = nil // the library was initialised again: the old sessions and handles are gone
	}
	if k = t.conn; k != nil {
		if n := len(k.idle); n > 0 {
			s, k.idle = k.idle[n-1], k.idle[:n-1]
			return k, s, false, nil
		}
		if s, err = t.openSession(k.slot); err != nil {
			return nil, 0, lost(err), err
		}
		return k, s, false, nil
	}
	return t.connect(gen)
}

// openSession opens a read-only session on slot and logs it in (a login holds for every session of the
// process, so a token that already has one answers CKR_USER_ALREADY_LOGGED_IN).
func (t *token) openSession(slot uint) (p11.SessionHandle, error) {
	c := t.mod.ctx
	s, err := c.OpenSession(slot, p11.CKF_SERIAL_SESSION)
	if err != nil {
		return 0, fmt.Errorf("%w: C_OpenSession: %w", kleidi.ErrUnavailable, err)
	}
	// miekg/pkcs11 takes the PIN as a string: a copy that cannot be zeroed, the one exception to keeping secrets in
	// byte slices that Close zeroes.
	if err := c.Login(s, p11.CKU_USER, string(t.pin)); err != nil && !hasCode(err, p11.CKR_USER_ALREADY_LOGGED_IN) {
		c.CloseSession(s)
		if hasCode(err, p11.CKR_PIN_INCORRECT, p11.CKR_PIN_INVALID, p11.CKR_PIN_LEN_RANGE, p11.CKR_PIN_LOCKED, p11.CKR_PIN_EXPIRED) {
			t.pinErr = fmt.Errorf("%w: %w: log in: %w; the PIN is not tried again, so that retries do not lock the token: fix the PIN file and restart",
				ErrPIN, kleidi.ErrUnavailable, err)
			clear(t.pin)
			return 0, t.pinErr
		}
		return 0, fmt.Errorf("%w: C_Login: %w", kleidi.ErrUnavailable, err)
	}
	return s, nil
}

// connect finds the slot of the token, logs in, finds (or creates) the keys and checks them. t.mu is held.
func (t *token) connect(gen uint64) (*conn, p11.SessionHandle, bool, error) {
	c := t.mod.ctx
	slot, err := t.findSlot()
	if err != nil {
		return nil, 0, true, err
	}
	s, err := t.openSession(slot)
	if err != nil {
		return nil, 0, lost(err), err
	}
	keys, err := t.findKeys(s, slot)
	if err != nil {
		c.CloseSession(s)
		return nil, 0, lost(err), err
	}
	t.conn = &conn{gen: gen, slot: slot, aes: keys[0], mac: keys[1]}
	return t.conn, s, false, nil
}

// findSlot returns the slot that holds the token labelled t.cfg.Token.
func (t *token) findSlot() (uint, error) {
	c := t.mod.ctx
	slots, err := c.GetSlotList(true)
	if err != nil {
		return 0, fmt.Errorf("%w: C_GetSlotList: %w", kleidi.ErrUnavailable, err)
	}
	var found []uint
	for _, slot := range slots {
		info, err := c.GetTokenInfo(slot)
		if err == nil && info.Label == t.cfg.Token {
			found = append(found, slot)
		}
	}
	switch len(found) {
	case 0:
		return 0, fmt.Errorf("%w: no token labelled %q in the module's %d slots with a token", kleidi.ErrUnavailable, t.cfg.Token, len(slots))
	case 1:
		return found[0], nil
	}
	return 0, fmt.Errorf("%w: %d tokens are labelled %q: give each token a label of its own", kleidi.ErrUnavailable, len(found), t.cfg.Token)
}

// keyKinds are the two keys of a provider, in the order findKeys returns them.
var keyKinds = []struct {
	name    string
	keyType uint
	usage   []uint // attributes that must be true
}{
	{"AES wrapping key", p11.CKK_AES, []uint{p11.CKA_ENCRYPT, p11.CKA_DECRYPT}},
	{"generic secret proof key", p11.CKK_GENERIC_SECRET, []uint{p11.CKA_SIGN}},
}

// findKeys returns the handles of the wrapping key and the proof key, creating the missing ones with
// t.cfg.CreateKeys, and checks that each is fit.
func (t *token) findKeys(s p11.SessionHandle, slot uint) ([2]p11.ObjectHandle, error) {
	var keys [2]p11.ObjectHandle
	var id []byte
	for i, kind := range keyKinds {
		h, found, err := t.findKey(s, kind.keyType)
		if err != nil {
			return keys, err
		}
		if !found {
			if !t.cfg.CreateKeys {
				return keys, fmt.Errorf("%w: %w: no %s on the token: run kleidi-server init --provider pkcs11 to create it", ErrKey, kleidi.ErrUnavailable, kind.name)
			}
			if id == nil {
				if id = t.cfg.KeyID; id == nil {
					id = make([]byte, 16)
					rand.Read(id)
				}
			}
			if h, err = t.createKey(slot, kind.keyType, id); err != nil {
				return keys, fmt.Errorf("%w: create the %s: %w", kleidi.ErrUnavailable, kind.name, err)
			}
		}
		if err := t.checkKey(s, h, kind.name, kind.keyType, kind.usage); err != nil {
			return keys, err
		}
		keys[i] = h
	}
	return keys, nil
}

// keyTemplate is what selects the keys of t.cfg.
func (t *token) keyTemplate(keyType uint) []*p11.Attribute {
	a := []*p11.Attribute{p11.NewAttribute(p11.CKA_CLASS, p11.CKO_SECRET_KEY), p11.NewAttribute(p11.CKA_KEY_TYPE, keyType)}
	if t.cfg.KeyLabel != "" {
		a = append(a, p11.NewAttribute(p11.CKA_LABEL, t.cfg.KeyLabel))
	}
	if t.cfg.KeyID != nil {
		a = append(a, p11.NewAttribute(p11.CKA_ID, t.cfg.KeyID))
	}
	return a
}

// findKey returns the one key of keyType that t.cfg selects.
func (t *token) findKey(s p11.SessionHandle, keyType uint) (p11.ObjectHandle, bool, error) {
	c := t.mod.ctx
	if err := c.FindObjectsInit(s, t.keyTemplate(keyType)); err != nil {
		return 0, false, fmt.Errorf("%w: C_FindObjectsInit: %w", kleidi.ErrUnavailable, err)
	}
	found, _, err := c.FindObjects(s, 2)
	c.FindObjectsFinal(s)
	switch {
	case err != nil:
		return 0, false, fmt.Errorf("%w: C_FindObjects: %w", kleidi.ErrUnavailable, err)
	case len(found) > 1:
		return 0, false, fmt.Errorf("%w: %w: several keys of type %#x match: give the key a label or ID of its own", ErrKey, kleidi.ErrUnavailable, keyType)
	case len(found) == 0:
		return 0, false, nil
	}
	return found[0], true, nil
}

// createKey generates a key of keyType on the token: a token object, private, sensitive, never extractable,
// usable only for what the provider does with it (encrypt and decrypt with the AES key, sign with the HMAC key).
func (t *token) createKey(slot uint, keyType uint, id []byte) (p11.ObjectHandle, error) {
	c := t.mod.ctx
	s, err := c.OpenSession(slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
	if err != nil {
		return 0, err
	}
	defer c.CloseSession(s)
	mech := uint(p11.CKM_AES_KEY_GEN)
	if keyType == p11.CKK_GENERIC_SECRET {
		mech = p11.CKM_GENERIC_SECRET_KEY_GEN
	}
	aes := keyType == p11.CKK_AES
	template := append(t.keyTemplate(keyType),
		p11.NewAttribute(p11.CKA_TOKEN, true), p11.NewAttribute(p11.CKA_PRIVATE, true),
		p11.NewAttribute(p11.CKA_SENSITIVE, true), p11.NewAttribute(p11.CKA_EXTRACTABLE, false),
		p11.NewAttribute(p11.CKA_ENCRYPT, aes), p11.NewAttribute(p11.CKA_DECRYPT, aes),
		p11.NewAttribute(p11.CKA_SIGN, !aes), p11.NewAttribute(p11.CKA_VERIFY, false),
		p11.NewAttribute(p11.CKA_WRAP, false), p11.NewAttribute(p11.CKA_UNWRAP, false), p11.NewAttribute(p11.CKA_DERIVE, false),
		p11.NewAttribute(p11.CKA_VALUE_LEN, 32))
	if t.cfg.KeyID == nil {
		template = append(template, p11.NewAttribute(p11.CKA_ID, id))
	}
	return c.GenerateKey(s, []*p11.Mechanism{p11.NewMechanism(mech, nil)}, template)
}

// checkKey refuses a key that could leave the token or is not of the expected type, size and usage.
func (t *token) checkKey(s p11.SessionHandle, h p11.ObjectHandle, name string, keyType uint, usage []uint) error {
	attrs := []*p11.Attribute{p11.NewAttribute(p11.CKA_SENSITIVE, nil), p11.NewAttribute(p11.CKA_EXTRACTABLE, nil),
		p11.NewAttribute(p11.CKA_ALWAYS_SENSITIVE, nil), p11.NewAttribute(p11.CKA_NEVER_EXTRACTABLE, nil),
		p11.NewAttribute(p11.CKA_VALUE_LEN, nil)}
	for _, u := range usage {
		attrs = append(attrs, p11.NewAttribute(u, nil))
	}
	got, err := t.mod.ctx.GetAttributeValue(s, h, attrs)
	if err != nil {
		return fmt.Errorf("%w: read the attributes of the %s: %w", kleidi.ErrUnavailable, name, err)
	}
	value := map[uint][]byte{}
	for _, a := range got {
		value[a.Type] = a.Value
	}
	isTrue := func(typ uint) bool { v := value[typ]; return len(v) == 1 && v[0] != 0 }
	var problem string
	switch size := ulong(value[p11.CKA_VALUE_LEN]); {
	case !isTrue(p11.CKA_SENSITIVE):
		problem = "it is not sensitive (CKA_SENSITIVE false)"
	case isTrue(p11.CKA_EXTRACTABLE) || len(value[p11.CKA_EXTRACTABLE]) != 1:
		problem = "it is extractable (CKA_EXTRACTABLE true)"
	case !isTrue(p11.CKA_ALWAYS_SENSITIVE) || !isTrue(p11.CKA_NEVER_EXTRACTABLE):
		// A key that was once readable may have been copied out before it was locked down.
		problem = "it was sensitive or non-extractable not from its creation (CKA_ALWAYS_SENSITIVE or CKA_NEVER_EXTRACTABLE false)"
	case keyType == p11.CKK_AES && size != 32:
		problem = fmt.Sprintf("it has %d bytes, want 32 (AES-256)", size)
	case keyType == p11.CKK_GENERIC_SECRET && size < 32:
		problem = fmt.Sprintf("it has %d bytes, want at least 32", size)
	}
	for _, u := range usage {
		if problem == "" && !isTrue(u) {
			problem = fmt.Sprintf("it lacks the usage attribute %#x", u)
		}
	}
	if problem != "" {
		return fmt.Errorf("%w: %w: the %s is unfit as a root of trust: %s", ErrKey, kleidi.ErrUnavailable, name, problem)
	}
	return nil
}

// ulong decodes a CK_ULONG attribute value.
func ulong(b []byte) uint64 {
	switch len(b) {
	case 8:
		return binary.NativeEndian.Uint64(b)
	case 4:
		return uint64(binary.NativeEndian.Uint32(b))
	}
	return 0
}

// put returns a session to the pool of k, or closes it if k is no longer the connection.
func (t *token) put(k *conn, s p11.SessionHandle) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.conn == k && !t.closed {
		k.idle = append(k.idle, s)
		return
	}
	t.mod.ctx.CloseSession(s)
}

// drop forgets the connection of generation gen.
func (t *token) drop(gen uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.conn != nil && t.conn.gen == gen {
		t.conn = nil
	}
}

// lostCodes are the return values that show the token, the session or the library gone.
var lostCodes = []uint{
	p11.CKR_DEVICE_REMOVED, p11.CKR_DEVICE_ERROR, p11.CKR_DEVICE_MEMORY, p11.CKR_TOKEN_NOT_PRESENT,
	p11.CKR_TOKEN_NOT_RECOGNIZED, p11.CKR_SESSION_HANDLE_INVALID, p11.CKR_SESSION_CLOSED,
	p11.CKR_CRYPTOKI_NOT_INITIALIZED, p11.CKR_SLOT_ID_INVALID, p11.CKR_USER_NOT_LOGGED_IN,
	p11.CKR_OBJECT_HANDLE_INVALID, p11.CKR_KEY_HANDLE_INVALID, p11.CKR_GENERAL_ERROR, p11.CKR_FUNCTION_FAILED,
}

// refusalCodes are the return values with which a token may refuse a ciphertext it cannot authenticate
// (SoftHSM 2 answers CKR_GENERAL_ERROR to a wrong GCM tag).
var refusalCodes = []uint{
	p11.CKR_ENCRYPTED_DATA_INVALID, p11.CKR_ENCRYPTED_DATA_LEN_RANGE, p11.CKR_DATA_INVALID, p11.CKR_DATA_LEN_RANGE,
	p11.CKR_ARGUMENTS_BAD, p11.CKR_MECHANISM_PARAM_INVALID, p11.CKR_GENERAL_ERROR, p11.CKR_FUNCTION_FAILED,
}

func lost(err error) bool { return hasCode(err, lostCodes...) }

// hasCode reports whether err is one of the PKCS#11 return values codes.
func hasCode(err error, codes ...uint) bool {
	var e p11.Error
	if !errors.As(err, &e) {
		return false
	}
	for _, c := range codes {
		if uint(e) == c {
			return true
		}
	}
	return false
}

func (t *token) encrypt(ctx context.Context, aad, plaintext []byte) (iv, ciphertext []byte, err error) {
	iv = make([]byte, ivSize)
	if _, err := rand.Read(iv); err != nil {
		return nil, nil, err
	}
	err = t.do(ctx, "encrypt", func(c *p11.Ctx, s p11.SessionHandle, k *conn) error {
		params := p11.NewGCMParams(iv, aad, tagSize*8)
		defer params.Free()
		if err := c.EncryptInit(s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_GCM, params)}, k.aes); err != nil {
			return err
		}
		out, err := c.Encrypt(s, plaintext)
		if err != nil {
			return err
		}
		if used := params.IV(); len(used) > 0 {
			iv = used // a token that chooses its own IV reports it here
		}
		ciphertext = out
		return nil
	})
	if err != nil {
		return nil, nil, err
	}
	return iv, ciphertext, nil
}

func (t *token) decrypt(ctx context.Context, iv, aad, ciphertext []byte) (plaintext []byte, err error) {
	err = t.do(ctx, "decrypt", func(c *p11.Ctx, s p11.SessionHandle, k *conn) error {
		params := p11.NewGCMParams(iv, aad, tagSize*8)
		defer params.Free()
		if err := c.DecryptInit(s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_GCM, params)}, k.aes); err != nil {
			return err
		}
		out, err := c.Decrypt(s, ciphertext)
		if err == nil {
			plaintext = out
			return nil
		}
		if !hasCode(err, refusalCodes...) {
			return err
		}
		// The token refused the ciphertext, or failed: it is a refusal if the token still answers.
		if perr := probe(c, s, k); perr != nil {
			return perr
		}
		return fmt.Errorf("%w: the token cannot authenticate the wrapped key (made with another key, or altered): %w", kleidi.ErrUnwrap, err)
	})
	return plaintext, err
}

func (t *token) sign(ctx context.Context, message []byte) (mac []byte, err error) {
	err = t.do(ctx, "sign", func(c *p11.Ctx, s p11.SessionHandle, k *conn) error {
		if err := c.SignInit(s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_SHA256_HMAC, nil)}, k.mac); err != nil {
			return err
		}
		mac, err = c.Sign(s, message)
		return err
	})
	return mac, err
}

func (t *token) health(ctx context.Context) error {
	return t.do(ctx, "health", probe)
}

// probe checks that the token answers and that its keys work: the token's information, the proof key's class,
// and an AES-GCM round trip with the wrapping key. It is the health probe, and it tells a refused ciphertext from
// a token that failed.
func probe(c *p11.Ctx, s p11.SessionHandle, k *conn) error {
	if _, err := c.GetTokenInfo(k.slot); err != nil {
		return err
	}
	if _, err := c.GetAttributeValue(s, k.mac, []*p11.Attribute{p11.NewAttribute(p11.CKA_CLASS, nil)}); err != nil {
		return err
	}
	// A round trip with the wrapping key itself: the client of a network HSM may answer token and attribute
	// queries from a cache while its cryptographic back end is down, and that must not pass for a refusal.
	iv := make([]byte, ivSize)
	if _, err := rand.Read(iv); err != nil {
		return err
	}
	aad, text := []byte("kleidi pkcs11 probe"), []byte("kleidi pkcs11 probe text")
	params := p11.NewGCMParams(iv, aad, tagSize*8)
	defer params.Free()
	if err := c.EncryptInit(s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_GCM, params)}, k.aes); err != nil {
		return err
	}
	ct, err := c.Encrypt(s, text)
	if err != nil {
		return err
	}
	if used := params.IV(); len(used) > 0 {
		iv = used
	}
	dparams := p11.NewGCMParams(iv, aad, tagSize*8)
	defer dparams.Free()
	if err := c.DecryptInit(s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_GCM, dparams)}, k.aes); err != nil {
		return err
	}
	got, err := c.Decrypt(s, ct)
	if err != nil {
		return err
	}
	if !bytes.Equal(got, text) {
		return fmt.Errorf("%w: the token's AES-GCM round trip changed the data", kleidi.ErrUnavailable)
	}
	return nil
}

// close waits for the calls in flight, closes the sessions and releases the module.
func (t *token) close() {
	close(t.done)
	for range cap(t.sem) {
		t.sem <- struct{}{}
	}
	t.mu.Lock()
	k := t.conn
	t.conn, t.closed = nil, true
	clear(t.pin)
	t.mu.Unlock()
	if k != nil {
		t.mod.mu.RLock()
		if t.mod.ready && t.mod.gen == k.gen {
			for _, s := range k.idle {
				t.mod.ctx.CloseSession(s)
			}
		}
		t.mod.mu.RUnlock()
	}
	t.mod.release()
}
