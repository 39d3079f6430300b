-- One miltertest worker for bench/bench_milter.py: full milter conversations in a loop.
--
-- Globals (miltertest -D name=value):
--   sock     libmilter socket spec, e.g. unix:/tmp/x.sock or inet:PORT@127.0.0.1
--   count    upper bound on messages
--   deadline stop after the message in progress once os.time() reaches this epoch second
--   retries  connection attempts 50 ms apart (the milter may still be starting)
--   header   header field the milter must insert at end of message (checked every message)
--   show     if set, print the first message's inserted header value as "HEADER <value>"
--            (line breaks of a folded value shown as \n)
--
-- Each message is one connection: connect, conninfo, helo, macros at MAIL (Postfix names for a
-- trusted client certificate), MAIL FROM, RCPT TO, two headers, EOH, body, EOM, EOM check,
-- disconnect. Like a real MTA, steps the milter negotiated away (SMFIP_NO*) are not sent
-- (miltertest refuses them). Prints "STEPS ..." once, "DONE <messages>" at the end; a failure
-- prints "FAIL ..." and stops the loop.

local limit = tonumber(count) or 1
local stop_at = tonumber(deadline) or (os.time() + 1)
local attempts = tonumber(retries) or 40
local done = 0
local sent = {}

-- Run one protocol step unless the milter negotiated it away; raise on error.
local function step(conn, name, option, fn, ...)
  if option ~= nil and mt.test_option(conn, option) then
    return
  end
  local err = fn(conn, ...)
  if err ~= nil then
    error(name .. ": " .. tostring(err), 0)
  end
  sent[name] = true
end

local function message(i)
  local conn = mt.connect(sock, attempts, 0.05)
  if conn == nil then
    error("connect " .. tostring(sock), 0)
  end
  step(conn, "conninfo", SMFIP_NOCONNECT, mt.conninfo, "out.sender.test", "192.0.2.25")
  step(conn, "helo", SMFIP_NOHELO, mt.helo, "out.sender.test")
  step(conn, "macro", nil, mt.macro, SMFIC_MAIL,
    "{tls_version}", "TLSv1.3",
    "{cert_subject}", "out.sender.test",
    "{cert_issuer}", "Test CA",
    "i", "Q" .. tostring(i))
  step(conn, "mailfrom", SMFIP_NOMAIL, mt.mailfrom, "<a@sender.test>")
  step(conn, "rcptto", SMFIP_NORCPT, mt.rcptto, "<b@receiver.test>")
  step(conn, "header", SMFIP_NOHDRS, mt.header, "From", "a@sender.test")
  step(conn, "header", SMFIP_NOHDRS, mt.header, "Subject", "bench " .. tostring(i))
  step(conn, "eoh", SMFIP_NOEOH, mt.eoh)
  step(conn, "body", SMFIP_NOBODY, mt.bodystring, "hello\r\n")
  step(conn, "eom", nil, mt.eom)
  if not mt.eom_check(conn, MT_HDRINSERT, header) then
    error("no " .. header .. " inserted", 0)
  end
  if mt.getreply(conn) ~= SMFIR_ACCEPT then
    error("reply " .. tostring(mt.getreply(conn)) .. " is not accept", 0)
  end
  if show ~= nil and i == 1 then
    local value = string.gsub(tostring(mt.getheader(conn, header, 0)), "\r?\n", "\\n")
    mt.echo("HEADER " .. value)
  end
  step(conn, "disconnect", nil, mt.disconnect)
end

for i = 1, limit do
  local ok, err = pcall(message, i)
  if not ok then
    mt.echo("FAIL message " .. tostring(i) .. ": " .. tostring(err))
    break
  end
  done = i
  if i == 1 then
    local names = {}
    for name in pairs(sent) do names[#names + 1] = name end
    table.sort(names)
    mt.echo("STEPS " .. table.concat(names, ","))
  end
  if os.time() >= stop_at then break end
end

mt.echo("DONE " .. tostring(done))
