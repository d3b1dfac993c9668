-- Argo CD health check for scopedsecrets.io/ScopedSecret. Add it to argocd-cm:
--   resource.customizations.health.scopedsecrets.io_ScopedSecret: |
--     <this file>
-- Progressing until the operator has reported on the current generation (observedGeneration);
-- then Degraded with "<reason>: <message>" of Ready when Ready=False (the Secret, if any, is
-- kept as last synced); Suspended with the breaker's message when Ready=True but
-- RolloutsPaused=True (the Secret follows Vault, its workloads are not restarted onto it);
-- Healthy when Ready=True. tests/argocd_health.rs runs this file as shipped (Lua 5.1).
local hs = {}
if obj.status == nil or obj.status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to sync"
  return hs
end
if obj.status.observedGeneration ~= nil and obj.metadata.generation ~= nil
   and obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to sync the new spec"
  return hs
end
local ready = nil
local paused = nil
for _, c in ipairs(obj.status.conditions) do
  if c.type == "Ready" then
    ready = c
  elseif c.type == "RolloutsPaused" and c.status == "True" then
    paused = c
  end
end
if ready == nil then
  hs.status = "Progressing"
  hs.message = "no Ready condition yet"
  return hs
end
if ready.status ~= "True" then
  hs.status = "Degraded"
  hs.message = (ready.reason or "NotReady") .. ": " .. (ready.message or "")
  return hs
end
if paused ~= nil then
  hs.status = "Suspended"
  hs.message = "RolloutsPaused: " .. (paused.message or "restarts are paused")
  return hs
end
hs.status = "Healthy"
hs.message = ready.message
return hs
