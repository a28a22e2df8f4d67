-- imsys schema. `python -m imsys migrate` applies this file; every statement is
-- idempotent, so it runs on every deploy and on an existing database alike.

CREATE TABLE IF NOT EXISTS tenants (
    id              bigserial PRIMARY KEY,
    name            text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    time_zone       text NOT NULL DEFAULT 'UTC',
    grace_period    interval NOT NULL DEFAULT '0 seconds',
    -- Share of a router's subscribers one sweep may cut off before it stops and asks.
    max_disconnect_share numeric(4, 3) NOT NULL DEFAULT 0.200,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS routers (
    id              bigserial PRIMARY KEY,
    tenant_id       bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name            text NOT NULL,
    host            text NOT NULL,
    port            integer NOT NULL DEFAULT 8728 CHECK (port BETWEEN 1 AND 65535),
    use_tls         boolean NOT NULL DEFAULT false,
    username        text NOT NULL,
    password        text NOT NULL,
    max_concurrency integer NOT NULL DEFAULT 5 CHECK (max_concurrency BETWEEN 1 AND 50),
    -- Live facts, read from the router (never pushed).
    online          boolean,
    version         text,
    uptime          text,
    cpu_load        integer,
    last_seen_at    timestamptz,
    last_error      text,
    -- An operator must confirm a sweep that would cut off too many subscribers.
    guard_tripped_at timestamptz,
    guard_reason    text,
    -- Until then, an operator has confirmed that the guard may let large changes through.
    guard_override_until timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

CREATE TABLE IF NOT EXISTS packages (
    id              bigserial PRIMARY KEY,
    tenant_id       bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name            text NOT NULL,
    profile         text NOT NULL,
    rate_limit      text,
    price           numeric(12, 2) NOT NULL CHECK (price >= 0),
    period_days     integer NOT NULL CHECK (period_days BETWEEN 1 AND 366),
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

CREATE TABLE IF NOT EXISTS subscribers (
    id              bigserial PRIMARY KEY,
    tenant_id       bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    router_id       bigint NOT NULL REFERENCES routers(id),
    package_id      bigint NOT NULL REFERENCES packages(id),
    -- Desired state (the database is the master for intent).
    username        text NOT NULL,
    password        text NOT NULL,
    service         text NOT NULL CHECK (service IN ('pppoe', 'hotspot')),
    is_suspended    boolean NOT NULL DEFAULT false,
    expires_at      timestamptz,
    phone           text,
    email           text,
    deleted_at      timestamptz,
    desired_version bigint NOT NULL DEFAULT 1,
    -- The live session must end for a change to take effect (suspension, new package);
    -- kept until a sync has ended it, so a retry after a lost reply still kicks.
    kick_required   boolean NOT NULL DEFAULT false,
    -- Correlation ids of the changes not yet synced: the audit log links each of them to
    -- the router commands that carried it out, even when several changes coalesce.
    pending_correlations text[] NOT NULL DEFAULT '{}',
    -- Sync state.
    sync_status     text NOT NULL DEFAULT 'pending' CHECK (sync_status IN ('pending', 'synced', 'error')),
    sync_error      text,
    synced_version  bigint NOT NULL DEFAULT 0,
    last_synced_at  timestamptz,
    -- Facts from the router (the router is the master for facts).
    online          boolean NOT NULL DEFAULT false,
    address         text,
    uptime          text,
    last_seen_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS subscribers_router_username
    ON subscribers (router_id, service, username) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS subscribers_tenant_expiry
    ON subscribers (tenant_id, expires_at) WHERE deleted_at IS NULL AND NOT is_suspended;
CREATE INDEX IF NOT EXISTS subscribers_sync_status ON subscribers (sync_status) WHERE sync_status <> 'synced';
-- The admin search (ILIKE '%fragment%' on username, phone, e-mail) reads trigram
-- indexes instead of scanning the table; pg_trgm ships with PostgreSQL (contrib).
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE INDEX IF NOT EXISTS subscribers_username_trgm
    ON subscribers USING gin (username gin_trgm_ops) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS subscribers_phone_trgm
    ON subscribers USING gin (phone gin_trgm_ops) WHERE deleted_at IS NULL;
CREATE INDEX IF NOT EXISTS subscribers_email_trgm
    ON subscribers USING gin (email gin_trgm_ops) WHERE deleted_at IS NULL;

-- Ids here are copies taken when the invoice is made (the subscriber, their tenant, the
-- package billed), without foreign keys: a check per row would double the cost of a
-- 100,000-invoice billing run, and imsys never hard-deletes a subscriber (deleted_at).
CREATE TABLE IF NOT EXISTS invoices (
    id              bigserial PRIMARY KEY,
    tenant_id       bigint NOT NULL,
    subscriber_id   bigint NOT NULL,
    package_id      bigint NOT NULL,
    period          text NOT NULL,
    amount          numeric(12, 2) NOT NULL,
    due_at          timestamptz NOT NULL,
    status          text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'paid', 'void')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (subscriber_id, period)
);

-- A tenant's own message templates, over the defaults in the configuration.
CREATE TABLE IF NOT EXISTS message_templates (
    tenant_id       bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    template        text NOT NULL,
    body            text NOT NULL CHECK (length(body) BETWEEN 1 AND 1000),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, template)
);

-- One row per tenant and period once its bills exist (the timer skips those).
CREATE TABLE IF NOT EXISTS billing_runs (
    tenant_id       bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    period          text NOT NULL,
    invoices        integer NOT NULL,
    completed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, period)
);

CREATE TABLE IF NOT EXISTS payments (
    id              bigserial PRIMARY KEY,
    tenant_id       bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    subscriber_id   bigint NOT NULL REFERENCES subscribers(id),
    amount          numeric(12, 2) NOT NULL CHECK (amount > 0),
    reference       text NOT NULL UNIQUE,
    applied_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- The message ledger keeps ids without foreign keys: subscribers are only ever soft-deleted,
-- and a check per row would double the cost of a billing run's 100,000 messages.
CREATE TABLE IF NOT EXISTS notifications (
    id              bigserial PRIMARY KEY,
    tenant_id       bigint,
    subscriber_id   bigint,
    channel         text NOT NULL CHECK (channel IN ('sms', 'whatsapp', 'email')),
    recipient       text NOT NULL,
    template        text NOT NULL,
    body            text NOT NULL,
    dedupe_key      text NOT NULL UNIQUE,
    status          text NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'sent', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    provider_message_id text,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz
);

-- Transactional outbox: a row written with the change it announces; the relay moves
-- it to its stream and deletes it.
CREATE TABLE IF NOT EXISTS outbox (
    id              bigserial PRIMARY KEY,
    stream          text NOT NULL,
    type            text NOT NULL,
    payload         jsonb NOT NULL,
    job_id          text,
    available_at    timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS outbox_available ON outbox (available_at, id);

-- Wake the relay at commit time (one notification per statement, not per row).
CREATE OR REPLACE FUNCTION imsys_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('imsys_outbox', '');
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS outbox_notify ON outbox;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION imsys_outbox_notify();

CREATE TABLE IF NOT EXISTS audit_log (
    id              bigserial PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    correlation_id  text NOT NULL,
    cause           text NOT NULL,
    tenant_id       bigint,
    router_id       bigint,
    subscriber_id   bigint,
    action          text NOT NULL,
    detail          jsonb NOT NULL DEFAULT '{}'::jsonb,
    outcome         text NOT NULL
);
-- A router command's row is written before the command ('unknown outcome') and completed
-- after it (outcome and completed_at); a kill in between leaves it unknown, never missing.
ALTER TABLE audit_log ADD COLUMN IF NOT EXISTS completed_at timestamptz;
CREATE INDEX IF NOT EXISTS audit_log_correlation ON audit_log (correlation_id);
CREATE INDEX IF NOT EXISTS audit_log_subscriber ON audit_log (subscriber_id, at);

-- Idempotency-Key of the admin API's creating POSTs: the first answer to (key, method,
-- path), replayed for 24 h to a retry with the same body (request_sha256). status is
-- NULL while the first request runs; locked_until lets a retry take over a claim whose
-- process died. 5xx answers are not kept (the row is deleted: the client may retry).
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key             text NOT NULL,
    method          text NOT NULL,
    path            text NOT NULL,
    request_sha256  bytea NOT NULL,
    claim           uuid NOT NULL,
    status          integer,
    response        bytea,
    created_at      timestamptz NOT NULL DEFAULT now(),
    locked_until    timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (key, method, path)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_expires ON idempotency_keys (expires_at);

-- Bouncer e-mail verification (imsys/bouncer). A user batch is a list of addresses to
-- check; the greedy creator packs pending addresses of all user batches, oldest first,
-- into Bouncer batches; results are stored once per address (emails_global).
CREATE TABLE IF NOT EXISTS emails_global (
    id              bigserial PRIMARY KEY,
    -- The canonical address: lower case, plus-tag stripped (and dots, for Gmail).
    email           text NOT NULL UNIQUE
);

CREATE TABLE IF NOT EXISTS user_batches (
    id              bigserial PRIMARY KEY,
    check_type      text NOT NULL CHECK (check_type IN ('deliverable', 'catchall')),
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'processing', 'completed', 'failed')),
    total           integer NOT NULL,
    -- Kept by the result handler as e-mails settle: done ones, and those that ended
    -- without a result; complete when processed + failed = total.
    processed       integer NOT NULL DEFAULT 0,
    failed          integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz
);
ALTER TABLE user_batches ADD COLUMN IF NOT EXISTS failed integer NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS user_batches_fifo ON user_batches (check_type, created_at, id)
    WHERE status IN ('queued', 'processing');
CREATE INDEX IF NOT EXISTS user_batches_recent ON user_batches (created_at DESC, id DESC);

CREATE TABLE IF NOT EXISTS bouncer_batches (
    id              bigserial PRIMARY KEY,
    check_type      text NOT NULL CHECK (check_type IN ('deliverable', 'catchall')),
    -- Set once Bouncer answered; NULL while the create is in flight (intent recorded).
    bouncer_batch_id text UNIQUE,
    -- creating: intent committed, call in flight; processing: Bouncer has it;
    -- completed: results ready; downloaded: results stored; failed: Bouncer failed it or
    -- it never finished; abandoned: the create failed or its answer was lost, and its
    -- e-mails went back to pending.
    status          text NOT NULL DEFAULT 'creating'
                    CHECK (status IN ('creating', 'processing', 'completed', 'downloaded', 'failed', 'abandoned')),
    quantity        integer NOT NULL,
    last_status     text,
    checked_at      timestamptz,
    download_attempts integer NOT NULL DEFAULT 0,
    error           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE bouncer_batches ADD COLUMN IF NOT EXISTS last_status text;
ALTER TABLE bouncer_batches ADD COLUMN IF NOT EXISTS checked_at timestamptz;
ALTER TABLE bouncer_batches ADD COLUMN IF NOT EXISTS download_attempts integer NOT NULL DEFAULT 0;
ALTER TABLE bouncer_batches ADD COLUMN IF NOT EXISTS error text;
CREATE INDEX IF NOT EXISTS bouncer_batches_open ON bouncer_batches (check_type, status)
    WHERE status IN ('creating', 'processing', 'completed');

-- No foreign keys here on purpose: a 1,000,000-address user batch would pay one
-- referential-integrity lookup per row and key (about 14 s of a 1M insert, measured on
-- the dev machine). Only imsys/bouncer/repo.py writes this table, and it takes both ids
-- from the rows it joins in the same statement.
CREATE TABLE IF NOT EXISTS user_batch_emails (
    id              bigserial PRIMARY KEY,
    user_batch_id   bigint NOT NULL,
    email_global_id bigint NOT NULL,
    -- The address as submitted (normalised): what Bouncer is asked to verify.
    email           text NOT NULL,
    bouncer_batch_id bigint,
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'assigned', 'done', 'failed'))
);
ALTER TABLE user_batch_emails DROP CONSTRAINT IF EXISTS user_batch_emails_user_batch_id_fkey;
ALTER TABLE user_batch_emails DROP CONSTRAINT IF EXISTS user_batch_emails_email_global_id_fkey;
ALTER TABLE user_batch_emails DROP CONSTRAINT IF EXISTS user_batch_emails_bouncer_batch_id_fkey;
CREATE INDEX IF NOT EXISTS user_batch_emails_pending ON user_batch_emails (user_batch_id, id)
    WHERE status = 'pending';
-- Pending rows have no Bouncer batch: leaving them out keeps a big insert cheap.
DROP INDEX IF EXISTS user_batch_emails_bouncer;
CREATE INDEX IF NOT EXISTS user_batch_emails_assigned
    ON user_batch_emails (bouncer_batch_id, email_global_id) WHERE bouncer_batch_id IS NOT NULL;

-- Results per mailbox. No foreign key to emails_global either: the result handler takes
-- each id from emails_global in the very statement that writes it, and the per-row
-- check cost a third of a 10,000-result download.
CREATE TABLE IF NOT EXISTS email_deliverable_results (
    email_global_id bigint PRIMARY KEY,
    status          text NOT NULL,
    reason          text,
    score           integer,
    result          jsonb NOT NULL,
    checked_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS email_catchall_results (
    email_global_id bigint PRIMARY KEY,
    is_catchall     boolean NOT NULL,
    domain          text,
    result          jsonb NOT NULL,
    checked_at      timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE email_deliverable_results
    DROP CONSTRAINT IF EXISTS email_deliverable_results_email_global_id_fkey;
ALTER TABLE email_catchall_results
    DROP CONSTRAINT IF EXISTS email_catchall_results_email_global_id_fkey;

-- Every Bouncer call, recorded just before it is made; the limit counts the last minute
-- across every process.
CREATE TABLE IF NOT EXISTS rate_limit_tracker (
    id              bigserial PRIMARY KEY,
    check_type      text NOT NULL,
    request_type    text NOT NULL,
    at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS rate_limit_tracker_at ON rate_limit_tracker (at);

-- Upgrades of databases made by an earlier schema.sql (each statement is idempotent).
ALTER TABLE invoices DROP CONSTRAINT IF EXISTS invoices_tenant_id_fkey;
ALTER TABLE invoices DROP CONSTRAINT IF EXISTS invoices_package_id_fkey;
ALTER TABLE invoices DROP CONSTRAINT IF EXISTS invoices_subscriber_id_fkey;
ALTER TABLE notifications DROP CONSTRAINT IF EXISTS notifications_tenant_id_fkey;
ALTER TABLE notifications DROP CONSTRAINT IF EXISTS notifications_subscriber_id_fkey;

-- Re-publication of intents (imsys/intents.py): each query walks a partial index of only
-- the rows whose work is unfinished, in id order, a bounded page at a time.
CREATE INDEX IF NOT EXISTS subscribers_unsynced ON subscribers (id)
    WHERE sync_status <> 'synced' OR desired_version > synced_version;
CREATE INDEX IF NOT EXISTS payments_unapplied ON payments (id) WHERE applied_at IS NULL;
CREATE INDEX IF NOT EXISTS notifications_queued ON notifications (id) WHERE status = 'queued';
-- A delivery claims a message before it calls the provider (the claim is fenced: only the
-- current delivery of the job may take it); another delivery waits until the claim is
-- released or older than its lease (the claimant died mid-call).
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS sending_at timestamptz;
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS sending_by text;

-- How imsys trusts a router's API-SSL certificate (imsys/routeros/tls.py): its SHA-256
-- pinned (lower-case hex; the usual case: MikroTik certificates are self-signed and
-- addressed by IP), a CA in PEM (no host name check), or tls_verify false (nothing
-- checked, a warning at every connect). None of them: the system CAs and the host name.
ALTER TABLE routers ADD COLUMN IF NOT EXISTS tls_fingerprint text
    CHECK (tls_fingerprint ~ '^[0-9a-f]{64}$');
ALTER TABLE routers ADD COLUMN IF NOT EXISTS tls_ca text;
ALTER TABLE routers ADD COLUMN IF NOT EXISTS tls_verify boolean NOT NULL DEFAULT true;
-- A deleted package stays (subscribers deleted earlier and invoices still name it) but
-- is gone from the API; its name may be used again by a new package of the tenant.
ALTER TABLE packages ADD COLUMN IF NOT EXISTS deleted_at timestamptz;
ALTER TABLE packages DROP CONSTRAINT IF EXISTS packages_tenant_id_name_key;
CREATE UNIQUE INDEX IF NOT EXISTS packages_live_name ON packages (tenant_id, name)
    WHERE deleted_at IS NULL;

-- The mass-disconnect guard holds only disconnections; what it holds, per cause
-- ("reconciliation", "sweep"), waits here for an operator to see and confirm.
ALTER TABLE routers ADD COLUMN IF NOT EXISTS guard_held jsonb NOT NULL DEFAULT '{}';
-- Why a subscriber is suspended: 'expired' (the sweep; a payment lifts it) or 'admin'
-- (the API; only an admin lifts it). NULL when not suspended.
ALTER TABLE subscribers ADD COLUMN IF NOT EXISTS suspension_reason text
    CHECK (suspension_reason IN ('expired', 'admin'));

-- SHA-256 (salted by the subscriber) of the password imsys last wrote to the subscriber's
-- router entry, never the password itself: an API user without the `sensitive` policy is
-- not shown passwords, so this decides whether the password must be written again.
-- NULL: unknown (never written, or a write whose outcome was lost): write it.
ALTER TABLE subscribers ADD COLUMN IF NOT EXISTS router_password_hash text;
-- A subscriber whose login name is taken on its router by an entry imsys does not manage
-- is blocked at that desired version: no sync writes, reconciliation leaves it alone,
-- until the subscriber changes (a new version) or the router is adopted (cleared).
ALTER TABLE subscribers ADD COLUMN IF NOT EXISTS blocked_version bigint;

-- === Messages that arrive (delivery receipts, WhatsApp templates, fallback, accounts) ===
-- The ledger goes queued → sent → delivered | read | failed, with the provider's own
-- status code and the time it gave; 'provider' names the API that took the message.
ALTER TABLE notifications DROP CONSTRAINT IF EXISTS notifications_status_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_status_check
    CHECK (status IN ('queued', 'sent', 'delivered', 'read', 'failed'));
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS provider text;
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS status_code text;
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS status_at timestamptz;
-- The template variables the body was rendered from: a WhatsApp template takes them as
-- its parameters when the customer's 24-hour window is closed.
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS vars jsonb NOT NULL DEFAULT '{}';
-- How it went out on WhatsApp: 'text' or the template's name.
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS sent_as text;
-- The SMS sent because this WhatsApp message failed (at most one: dedupe_key
-- 'fallback:<id>'), and on the SMS, the message it stands in for.
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS fallback_of bigint;
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS fallback_id bigint;
CREATE INDEX IF NOT EXISTS notifications_provider_id ON notifications (provider_message_id)
    WHERE provider_message_id IS NOT NULL;
-- WhatsApp messages still 'sent' (the fallback timer looks for the overdue ones).
CREATE INDEX IF NOT EXISTS notifications_wa_sent ON notifications (sent_at)
    WHERE status = 'sent' AND channel = 'whatsapp' AND fallback_id IS NULL;

-- The customer's last message to a WhatsApp business number: free-form text may go to
-- them for 24 hours after it (Meta's customer service window), a template otherwise.
CREATE TABLE IF NOT EXISTS whatsapp_windows (
    phone_number_id text NOT NULL,
    wa_id           text NOT NULL,
    last_inbound_at timestamptz NOT NULL,
    PRIMARY KEY (phone_number_id, wa_id)
);

-- A tenant's messaging: its own account (a name under [accounts] in the config, whose
-- credentials never reach the database), whether a failed WhatsApp message may go again
-- by SMS, and its WhatsApp templates per notification kind (else the configured ones).
CREATE TABLE IF NOT EXISTS tenant_messaging (
    tenant_id       bigint PRIMARY KEY REFERENCES tenants(id) ON DELETE CASCADE,
    account         text,
    sms_fallback    boolean NOT NULL DEFAULT true,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS whatsapp_templates (
    tenant_id       bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    kind            text NOT NULL,
    name            text NOT NULL,
    language        text NOT NULL,
    params          text[] NOT NULL DEFAULT '{}',
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, kind)
);

-- Seed deviations (router-outage cadence, active tenants, bouncer creates).
-- A tenant switched off (not paying for the service, closed): its subscribers are not
-- swept for expiry, not billed, not reminded, and its sync jobs are refused.
ALTER TABLE tenants ADD COLUMN IF NOT EXISTS active boolean NOT NULL DEFAULT true;
-- The Bouncer batch whose failed create put this e-mail back to 'pending': the creator's
-- cycle that released it does not pack it again (the seed: no retry in the same cycle).
ALTER TABLE user_batch_emails ADD COLUMN IF NOT EXISTS released_from bigint;
-- Every verified receipt, once (a replay inserts nothing): a receipt that arrives before
-- imsys recorded the provider's id is applied when it records it.
CREATE TABLE IF NOT EXISTS notification_receipts (
    channel             text NOT NULL,
    provider_message_id text NOT NULL,
    status              text NOT NULL,
    code                text,
    reason              text,
    at                  timestamptz NOT NULL,
    received_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, provider_message_id, status)
);

-- === Signal strength (imsys/sync/wireless.py) ===
-- The subscriber's device as a station in its router's wireless registration table,
-- matched by the session's MAC (PPPoE caller-id, hotspot mac-address) at each router
-- facts poll: the hardware is the master of these values, stored as the router printed
-- them (signal_dbm parsed from signal). One row per subscriber; a station that left keeps
-- its last reading with associated false, and last_seen_at says when it was last seen.
CREATE TABLE IF NOT EXISTS subscriber_wireless (
    subscriber_id bigint PRIMARY KEY REFERENCES subscribers(id),
    router_id     bigint NOT NULL REFERENCES routers(id) ON DELETE CASCADE,
    mac_address   text NOT NULL,
    source        text NOT NULL CHECK (source IN ('wireless', 'wifi')),
    interface     text,
    signal        text,
    signal_dbm    integer,
    tx_ccq        integer,
    rx_ccq        integer,
    tx_rate       text,
    rx_rate       text,
    uptime        text,
    last_activity text,
    associated    boolean NOT NULL DEFAULT true,
    last_seen_at  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS subscriber_wireless_router
    ON subscriber_wireless (router_id) WHERE associated;

-- === Router entry ids (imsys/sync/batch.py) ===
-- The router's `.id` of each entry imsys manages for the subscriber ({"/ppp/secret":
-- "*1A"}), so a sync looks its entries up by id instead of scanning the menu by
-- comment. NULL: not known (rows from before this column, or a write whose outcome was
-- lost): the next sync finds them by comment and keeps their ids. A new subscriber has
-- no entry anywhere yet: '{}'.
ALTER TABLE subscribers ADD COLUMN IF NOT EXISTS router_entries jsonb;
ALTER TABLE subscribers ALTER COLUMN router_entries SET DEFAULT '{}'::jsonb;

-- === Honest sync states (imsys/sync/batch.py) ===
-- pending: a change waits for its job; syncing: a job is working on it; retrying: an
-- attempt failed and another will come (sync_attempt, next_sync_at, sync_error say which,
-- when and why); synced; error: its job was dead-lettered or failed for good (or an
-- unmanaged twin blocks it).
ALTER TABLE subscribers DROP CONSTRAINT IF EXISTS subscribers_sync_status_check;
ALTER TABLE subscribers ADD CONSTRAINT subscribers_sync_status_check
    CHECK (sync_status IN ('pending', 'syncing', 'retrying', 'synced', 'error'));
ALTER TABLE subscribers ADD COLUMN IF NOT EXISTS sync_attempt integer;
ALTER TABLE subscribers ADD COLUMN IF NOT EXISTS next_sync_at timestamptz;

-- === Tenant-scoped API tokens (imsys/tokens.py, imsys/http/access.py) ===
-- A token bound to one tenant: it sees and changes that tenant's data only. Only the
-- SHA-256 of the token is kept (the token is shown once, when created); a request's
-- token is hashed and looked up. A tenant that goes takes its tokens with it.
CREATE TABLE IF NOT EXISTS api_tokens (
    id              bigserial PRIMARY KEY,
    tenant_id       bigint NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    token_sha256    bytea NOT NULL UNIQUE CHECK (length(token_sha256) = 32),
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz
);
CREATE INDEX IF NOT EXISTS api_tokens_tenant ON api_tokens (tenant_id);
-- The tenant a Bouncer user batch was submitted for (NULL: by the admin token, for no
-- tenant in particular); a tenant's token sees only its own batches.
ALTER TABLE user_batches ADD COLUMN IF NOT EXISTS tenant_id bigint
    REFERENCES tenants(id) ON DELETE SET NULL;
CREATE INDEX IF NOT EXISTS user_batches_tenant ON user_batches (tenant_id, created_at DESC, id DESC)
    WHERE tenant_id IS NOT NULL;

-- === Router maintenance (imsys/sync/maintenance.py) ===
-- Until this instant imsys leaves the router alone: its jobs wait without spending
-- attempts and the reconciliation timer passes it by. NULL or past: no maintenance.
ALTER TABLE routers ADD COLUMN IF NOT EXISTS maintenance_until timestamptz;

-- === Bulk work waits its turn (imsys/outbox.py) ===
-- Rows of timer-driven work (a reconciliation's, a sweep's jobs) are relayed only while
-- their stream holds fewer than sync.bulk_backlog entries; every other row at once.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS bulk boolean NOT NULL DEFAULT false;
CREATE INDEX IF NOT EXISTS outbox_bulk_due ON outbox (stream, available_at, id) WHERE bulk;
