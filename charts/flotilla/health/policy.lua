-- Argo CD health check for flotilla's policy kinds (admiral.io GlobalTrafficPolicy,
-- OutlierDetection, ClientConnectionConfig, Dependency): reads the status flotilla writes.
local hs = {}
local status = obj.status
if status == nil or status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for flotilla to report on this policy"
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "flotilla has not yet seen generation " .. generation
  return hs
end
local ready = nil
for _, c in ipairs(status.conditions) do
  if c.type == "Invalid" and c.status == "True" then
    hs.status = "Degraded"
    hs.message = "Invalid: " .. (c.message or "")
    return hs
  end
  if c.type == "Conflict" and c.status == "True" then
    hs.status = "Degraded"
    hs.message = "Conflict: " .. (c.message or "")
    return hs
  end
  if c.type == "Ready" then
    ready = c
  end
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message
  if hs.message == nil or hs.message == "" then
    hs.message = "Applied"
  end
  return hs
end
if ready ~= nil and ready.reason == "NotApplied" then
  hs.status = "Degraded"
  hs.message = ready.message
  return hs
end
hs.status = "Progressing"
hs.message = (ready ~= nil and ready.message) or "Waiting for flotilla to report on this policy"
return hs
