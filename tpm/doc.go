// Package tpm is a [kleidi.Provider] whose root of trust is a TPM 2.0, hardware or virtual: each key-encryption
// key (KEK) is sealed under the TPM's storage root key, so a copy of the disk, the keyring or an etcd backup is
// useless without the chip.
//
// # Transports
//
// [Config.Path] selects the TPM with one string:
//
//	/dev/tpmrm0              the kernel's resource manager (the default; prefer it)
//	/dev/tpm0                the raw device (no other process may use the TPM meanwhile)
//	tcp://127.0.0.1:2321     swtpm, or the TCG reference simulator (its platform port is 2322)
//	unix:///run/swtpm/sock   swtpm with --server type=unixio
//
// [Config.Open] takes the place of the path for any other transport: tpmsim.Open (package tpm/tpmsim, cgo builds
// only) is the in-process reference simulator, for tests and demos, kept out of this package so that importing it
// never links the simulator.
//
// The in-process simulator is manufactured afresh when a provider opens it and destroyed by [Provider.Close],
// so nothing it sealed survives the provider; a process runs one at a time (a second open fails). A binary built
// with CGO_ENABLED=0 reports that it has no simulator.
//
// On a device or the in-process simulator, a provider keeps one connection. On a socket (tcp:// and unix://) it
// connects for each operation (Wrap, Unwrap, Health, the checks of [New]) and disconnects after it: swtpm and the
// TCG reference simulator serve one client at a time, so several processes (kleidi-server serve and
// kleidi-server rotate, say) can share one swtpm, each waiting for the other's operation to end. Those emulators
// have no resource manager, so before it disconnects the provider flushes every transient object and session the
// operation loaded, a storage root key created for it included; Health sets up the storage root key and checks
// it against the pinned one, so a TPM cleared behind the plugin's back shows.
// Either way a provider serialises its own commands, and the context is checked before each command. When the
// connection fails (swtpm restarted, a device gone), calls return errors wrapping [kleidi.ErrUnavailable] and the
// next call reconnects: [Provider.Health] turns nil again once the TPM is back, without a restart.
//
// # Sealing
//
// The storage root key (SRK) is the TCG ECC P-256 SRK template under the owner hierarchy: taken from the reserved
// persistent handle 0x81000001 when the key there has that template, else created at start, or for each operation
// on a socket (a primary key is derived from the owner seed, so it is the same key every time). The owner hierarchy
// must have an empty auth value, as the TCG provisioning guidance recommends. Wrap creates a sealed data object
// under the SRK; its wrapped form (the public and private areas, the PCR selection and the SRK's name) is what the
// keyring stores: it is useless to any other TPM. Unwrap loads and unseals it, then flushes it; no transient object
// or session outlives a call. Keys travel to and from the TPM encrypted by a session salted with the SRK, so a
// probe on the TPM's bus does not see them.
//
// # Pinning the storage root key
//
// A session salted with the SRK protects a key only if the SRK is the TPM's own: something between the process
// and the TPM (a bus interposer, a process that answers in place of swtpm) could present a public key of its own.
// A provider therefore pins the SRK by its name (computed from its public area, never taken from the TPM's
// answer): the one of [Config.SRKName] when set, else the first one it finds when it starts (trust on first use).
// Every later operation that finds another SRK fails with an error wrapping [ErrStorageKeyChanged]: Wrap seals
// nothing, Unwrap unseals nothing, Health reports it. Unwrap also unseals only keys sealed under that SRK, so a
// KEK read from the keyring unwraps only on the chip that sealed it. Without [Config.SRKName], each process
// trusts the SRK it meets first: kleidi-server init on a fresh node trusts the TPM it finds, and so does every
// later start (a wrong SRK there makes the first Unwrap of a keyring key fail, so nothing is sealed under it).
// [Provider.SRKName] returns the pinned name: record it at init and pass it to every later provider to close
// that window.
//
// # Policy of a sealed key
//
// Unwrap unseals a key only if its policy is the one this provider's configuration gives now: the same PCR
// selection, the policy digest the current values of those PCRs give (the TPM binds the digest to the sealed
// object, so a forged header cannot change it), and an auth value exactly when one is configured. A key sealed by
// another process with no PCRs, or with other PCRs, is refused with an error wrapping [ErrPolicy] and
// [kleidi.ErrUnwrap], even though the TPM would unseal it: otherwise anyone with access to the TPM could make a
// PCR-bound provider accept a key of their choice.
//
// # Proofs
//
// [Provider] is a [kleidi.Authenticator]: the Envelope proves each wrapped copy it makes and verifies each copy
// that arrives from outside before it unwraps it. A proof is HMAC-SHA256 under a proof key that only this TPM can
// compute, and only under the configured policy: the TPM's HMAC, over a fixed label, with a keyed-hash primary key
// of the owner hierarchy whose template holds the configured policy digest as its authPolicy (so only a session
// that satisfies the PCR policy may use it) and HMAC-SHA256(auth value, label) as its unique field (so the key
// depends on the auth value). A primary key is derived from the owner seed and its template, so the proof key is
// the same at every start in the same boot state: a node that lost its keyring still verifies the copies attached
// to its ciphertexts. The key is derived at the first Prove or Verify, travels encrypted by a session salted with
// the pinned SRK, stays in memory (Verify never calls the TPM again) and is zeroed by [Provider.Close].
//
// A primary key's auth value is whatever its creator sets, so guesses at the auth value through the proof key are
// not counted by the TPM's dictionary-attack lockout, unlike guesses against a sealed key: the auth file should
// hold a random value (32 random bytes without a zero byte or newline), not a memorable one.
//
// # Several nodes
//
// A [Provider] is a [kleidi.Node]: one of several roots of trust that share a keyring, one TPM per control-plane
// node. [Provider.Identity] returns what another node needs to wrap KEKs for this one, with no access to this
// TPM:
//
//   - PublicKey: this TPM's endorsement key (EK), the TCG RSA 2048 EK template under the endorsement hierarchy
//     (taken from the persistent handle 0x81010001 when it holds that key, else created: the same key), and the
//     policy a key wrapped for this node must carry, with the configured PCR selection and whether an auth value
//     is set. Its format (magic "KTPN", version 1) is described in duplicate.go and pinned by a golden test.
//   - Certificate: the EK certificate from NV index 0x01c00002, when the TPM has one.
//   - VerifyKey: the public half of an ECDSA P-256 signing key that, like the proof key, is a primary key of the
//     owner hierarchy whose template holds the configured policy (PCRs and auth value): [Provider.Sign] works only
//     on this TPM, in the same boot state, with the same auth value.
//
// Everything in it derives from the TPM's seeds and the configuration, so the identity is the same at every start
// and after the keyring is lost; another boot state of the configured PCRs or another auth value gives another
// identity (enroll the node again after a planned change).
//
// [OpenRecipient] opens an identity as a [kleidi.Recipient]: it checks that the EK certificate, when there is one,
// certifies the EK (it does not check who issued it: compare the identity's ID with the one the node printed),
// and its Wrap duplicates a sealed data object holding the key to the EK in software (go-tpm's CreateDuplicate,
// an outer wrapper only), with no TPM. The result has its own format (magic "KTPD") beside the sealed keys
// ("KTPM"). The receiving node's Unwrap imports it under its EK (a PolicySecret session with the endorsement
// hierarchy), loads it and unseals it. The duplicate's policy is PolicySecret with this node's signing key, so
// that it unseals only where a session can use that key: on this TPM, with the PCR values and the auth value the
// identity was made with. A duplicate made for another TPM, or whose policy is not the one this configuration
// gives now, is refused with an error wrapping [kleidi.ErrUnwrap] (and [ErrPolicy] for a policy). At most three
// objects are loaded at a time, and everything is flushed before Unwrap returns, on a socket TPM too.
//
// Anyone who knows a node's identity can make a duplicate that its TPM unwraps: the library accepts a copy made
// elsewhere only with a signature of the member that made it ([kleidi.Identity.Verify]), checked before the copy
// reaches Unwrap.
//
// # PCR binding and auth value
//
// With [Config.PCRs] (flag --tpm-pcrs 7), new keys unseal only while those SHA-256 PCRs hold the values they had
// when the key was sealed. PCR 7 (the Secure Boot policy) is the usual choice; PCRs that change at every update
// (firmware 0, kernel and initrd 4, 8, 9) lock the keys out after an update. A changed PCR makes Unwrap fail with
// an error wrapping [ErrPolicy] and [kleidi.ErrUnwrap], and gives another proof key, so Verify refuses the proofs
// made before with [kleidi.ErrUnauthenticated]: neither serve nor rotate can start, and rotating beforehand does
// not help (the new KEK is sealed to the values of today). Before a planned change, rewrap every KEK from the
// PCR-bound provider to one without PCRs, make the change, then rewrap back to a provider bound to the same PCRs,
// which seals to the new values (kleidi.Rewrap; kleidi-server rewrap --from-tpm-pcrs). After an unplanned change,
// boot the previous configuration to get the old values back, or recover from a second root of trust.
//
// With [Config.AuthFile], new keys get an auth value (1 to 32 bytes read from the file; one trailing newline is
// ignored) that Unwrap must present. Such objects are protected by the TPM's dictionary-attack lockout: repeated
// wrong values lock the TPM out for a while, reported as [kleidi.ErrUnavailable]. Keep the file mode 0400, owned
// by the plugin's user.
//
// # Reboots and clears
//
// A reboot (or a TPM reset) unloads every transient object; the provider recreates the same SRK and every wrapped
// key unwraps again. A TPM clear (tpm2_clear, the firmware's "clear TPM", a new swtpm state directory) replaces
// the owner seed: every key sealed before is lost for good, and Unwrap fails with an error wrapping
// [ErrStorageKeyChanged]. Keep a second root of trust or a backup of the data before clearing a TPM.
//
// # Access for a non-root user
//
// The plugin needs no root: read-write access to /dev/tpmrm0 is enough. Debian and most distributions (the tpm2-tss
// package) ship a udev rule giving the tss group access:
//
//	KERNEL=="tpmrm[0-9]*", GROUP="tss", MODE="0660"
//
// (in /etc/udev/rules.d/60-tpm.rules if absent; then udevadm control --reload && udevadm trigger). Check with
// ls -l /dev/tpmrm0 (crw-rw---- root tss) and add the plugin's user to the group: usermod -aG tss kleidi, or
// SupplementaryGroups=tss in a systemd unit, or the group's gid in a pod's securityContext.supplementalGroups.
// Leave /dev/tpm0 to root: it bypasses the resource manager.
package tpm
