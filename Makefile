# make && make install [DESTDIR=...] [PREFIX=/usr]: what a package needs, in the places the
# systemd units and the default configuration expect.
PREFIX ?= /usr
SYSTEMD_UNIT_DIR ?= /lib/systemd/system
INSTALL ?= install
# Where `make` left the binaries (the tests install a debug build from target/debug).
BUILD_DIR ?= target/release

all:
	cargo build --release --locked --bins

install:
	$(INSTALL) -D -m 0755 $(BUILD_DIR)/sealgated $(DESTDIR)$(PREFIX)/bin/sealgated
	$(INSTALL) -D -m 0755 $(BUILD_DIR)/sealctl $(DESTDIR)$(PREFIX)/bin/sealctl
	$(INSTALL) -D -m 0755 $(BUILD_DIR)/sealgate-hq $(DESTDIR)$(PREFIX)/bin/sealgate-hq
	$(INSTALL) -D -m 0755 $(BUILD_DIR)/sealgate-console $(DESTDIR)$(PREFIX)/bin/sealgate-console
	$(INSTALL) -d $(DESTDIR)$(PREFIX)/share/sealgate/device-profiles
	$(INSTALL) -m 0644 device-profiles/*.toml $(DESTDIR)$(PREFIX)/share/sealgate/device-profiles/
	$(INSTALL) -D -m 0644 systemd/sealgated.service $(DESTDIR)$(SYSTEMD_UNIT_DIR)/sealgated.service
	$(INSTALL) -D -m 0644 systemd/sealgated.socket $(DESTDIR)$(SYSTEMD_UNIT_DIR)/sealgated.socket
	$(INSTALL) -D -m 0644 systemd/sealgate-hq.service $(DESTDIR)$(SYSTEMD_UNIT_DIR)/sealgate-hq.service
	$(INSTALL) -D -m 0644 systemd/sealgate-ship.service $(DESTDIR)$(SYSTEMD_UNIT_DIR)/sealgate-ship.service
	$(INSTALL) -D -m 0644 systemd/sealgate-notify.service $(DESTDIR)$(SYSTEMD_UNIT_DIR)/sealgate-notify.service
	$(INSTALL) -D -m 0644 systemd/sealgate-console.service $(DESTDIR)$(SYSTEMD_UNIT_DIR)/sealgate-console.service
	$(INSTALL) -D -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/sealgate/README.md
	$(INSTALL) -D -m 0644 docs/audit-log.md $(DESTDIR)$(PREFIX)/share/doc/sealgate/audit-log.md
	$(INSTALL) -D -m 0644 docs/headquarters.md $(DESTDIR)$(PREFIX)/share/doc/sealgate/headquarters.md
	$(INSTALL) -D -m 0644 docs/passkeys.md $(DESTDIR)$(PREFIX)/share/doc/sealgate/passkeys.md
	$(INSTALL) -D -m 0644 docs/console.md $(DESTDIR)$(PREFIX)/share/doc/sealgate/console.md
	$(INSTALL) -D -m 0644 docs/approvals.md $(DESTDIR)$(PREFIX)/share/doc/sealgate/approvals.md
	$(INSTALL) -D -m 0644 proto/sealgate/v1/sealgate.proto $(DESTDIR)$(PREFIX)/share/sealgate/proto/sealgate/v1/sealgate.proto
	$(INSTALL) -d -m 0750 $(DESTDIR)/etc/sealgate

.PHONY: all install
