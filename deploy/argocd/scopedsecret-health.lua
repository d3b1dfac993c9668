-- Argo CD health check for scopedsecrets.io/ScopedSecret. Add it to argocd-cm:
--   resource.customizations.health.scopedsecrets.io_ScopedSecret: |
--     <this file>
-- Healthy when Ready=True for the current generation; Degraded with the reason and message
-- when Ready=False; Progressing until the operator has reported on this generation.
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
for _, c in ipairs(obj.status.conditions) do
  if c.type == "Ready" then
    if c.status == "True" then
      hs.status = "Healthy"
      hs.message = c.message
    else
      hs.status = "Degraded"
      hs.message = (c.reason or "") .. ": " .. (c.message or "")
    end
    return hs
  end
end
hs.status = "Progressing"
hs.message = "no Ready condition yet"
return hs
