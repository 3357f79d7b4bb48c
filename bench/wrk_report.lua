-- wrk script of the bench: counts responses whose status is not the expected one (wrk's own
-- error count lets 3xx pass, and an anonymous /account is a 302) and prints one JSON line.
-- Usage: wrk ... -s bench/wrk_report.lua URL -- <expected status>

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  expect = tonumber(args[1] or "200")
  bad = 0
end

function response(status, headers, body)
  if status ~= expect then bad = bad + 1 end
end

function done(summary, latency, requests)
  local bad_total = 0
  for _, t in ipairs(threads) do bad_total = bad_total + (t:get("bad") or 0) end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"bad_status":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout, bad_total))
end
