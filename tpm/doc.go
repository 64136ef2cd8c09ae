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
//	simulator                the in-process reference simulator, for tests and demos (cgo builds only)
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
// operation loaded, a storage root key created for it included; Health sends one cheap command (TPM2_ReadClock).
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
// # PCR binding and auth value
//
// With [Config.PCRs] (flag --tpm-pcrs 7), new keys unseal only while those SHA-256 PCRs hold the values they had
// when the key was sealed. PCR 7 (the Secure Boot policy) is the usual choice; PCRs that change at every update
// (firmware 0, kernel and initrd 4, 8, 9) lock the keys out after an update. A changed PCR makes Unwrap fail with
// an error wrapping [ErrPolicy] and [kleidi.ErrUnwrap]; rotate the KEK while the old one still unwraps (before a
// planned change), or keep a second root of trust.
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
